"""One typed configuration for every entry point: YAML presets plus `section.key=value` overrides.

The same `Config` object is validated on the driver, shipped to Ray workers, flattened into MLflow
params and stored as JSON next to every checkpoint, so a checkpoint always knows how it was built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Reference defaults per encoder size (spec section 1); the paper words them 1-based.
REFERENCE_TARGET_LAYERS = {
    "small": [2, 3, 4, 5, 6, 7, 8, 9],
    "base": [2, 3, 4, 5, 6, 7, 8, 9],
    "large": [4, 6, 8, 10, 12, 14, 16, 18],
}


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose one-line help text becomes its `--help` entry."""
    return field(metadata={"doc": text}, **kwargs)


@dataclass(kw_only=True)
class DinomalyConfig:
    """The model: frozen encoder, noisy bottleneck, linear-attention decoder, loose layer groups."""

    encoder: str = doc("timm model name of the frozen encoder", default="vit_base_patch14_reg4_dinov2")
    encoder_weights: str = doc(
        "'hub' (timm's pretrained download), 'none' (random, tests only) or a path to a DINOv2 .pth, "
        "timm .safetensors/.pth file", default="hub")
    encoder_kwargs: dict[str, Any] = doc(
        "extra timm.create_model arguments, e.g. {embed_dim: 32, num_heads: 2} for tiny test encoders",
        default_factory=dict)
    target_layers: list[int] = doc(
        "0-based encoder blocks whose outputs are reconstructed", default_factory=lambda: [2, 3, 4, 5, 6, 7, 8, 9])
    fuse_groups: list[list[int]] = doc(
        "groups of indices into target_layers whose mean is compared (loose reconstruction); "
        "decoder layers are grouped the same way after reversal", default_factory=lambda: [[0, 1, 2, 3], [4, 5, 6, 7]])
    bottleneck_dropout: float = doc("dropout probability of the noisy MLP bottleneck (0.4 for Real-IAD)", default=0.2)
    decoder_depth: int = doc("number of linear-attention decoder blocks (= len(target_layers) in the reference)",
                             default=8)
    attention_eps: float = doc("eps added to the linear-attention normaliser (0 = reference; 1e-6 if training NaNs)",
                               default=0.0)
    image_size: int = doc("images are resized to image_size x image_size (PIL bilinear)", default=448)
    crop_size: int = doc("then centre-cropped to crop_size (a multiple of the patch size, 14)", default=392)

    def __post_init__(self) -> None:
        if self.crop_size % 14:
            lower, upper = self.crop_size // 14 * 14, (self.crop_size // 14 + 1) * 14
            raise ValueError(f"model.crop_size={self.crop_size} is not a multiple of the patch size 14; "
                             f"use {lower} or {upper}")
        if self.crop_size > self.image_size:
            raise ValueError(f"model.crop_size={self.crop_size} is larger than model.image_size="
                             f"{self.image_size}; the crop must fit inside the resized image")
        if not 0.0 <= self.bottleneck_dropout < 1.0:
            raise ValueError(f"model.bottleneck_dropout={self.bottleneck_dropout} must be in [0, 1)")
        if not self.target_layers:
            raise ValueError("model.target_layers is empty; give the encoder blocks to reconstruct, e.g. [2, ..., 9]")
        if sorted(set(self.target_layers)) != list(self.target_layers):
            raise ValueError(f"model.target_layers={self.target_layers} must be strictly increasing block indices")
        if min(self.target_layers) < 0:
            raise ValueError(f"model.target_layers={self.target_layers} has a negative block index")
        if self.decoder_depth < 1:
            raise ValueError(f"model.decoder_depth={self.decoder_depth} must be at least 1")
        n = len(self.target_layers)
        if self.decoder_depth != n:
            raise ValueError(f"model.decoder_depth={self.decoder_depth} differs from len(model.target_layers)={n}; "
                             "each group pairs encoder and decoder layers by index, so they must match")
        used = [i for group in self.fuse_groups for i in group]
        if not self.fuse_groups or any(not group for group in self.fuse_groups):
            raise ValueError(f"model.fuse_groups={self.fuse_groups} must be a non-empty list of non-empty groups")
        for gi, group in enumerate(self.fuse_groups):
            for i in group:
                if not 0 <= i < n:
                    raise ValueError(f"model.fuse_groups[{gi}] uses layer {i} but target_layers has {n} entries "
                                     f"(0-{n - 1}); fix model.fuse_groups")
        if len(set(used)) != len(used):
            raise ValueError(f"model.fuse_groups={self.fuse_groups} uses a layer twice; each layer belongs to one group")


@dataclass(kw_only=True)
class DataConfig:
    """Where the images come from and how they are read."""

    root: str = doc("dataset root (folder or s3://bucket/prefix) or a Parquet manifest (.parquet)", default="")
    layout: Literal["auto", "mvtec", "mpdd", "visa", "visa_raw", "realiad", "folder", "manifest"] = doc(
        "dataset layout of root ('auto' detects it)", default="auto")
    categories: list[str] = doc("classes to use (empty = all classes found)", default_factory=list)
    realiad_json_variant: str = doc("Real-IAD split folder under realiad_jsons/: realiad_jsons, realiad_jsons_sv, "
                                    "realiad_jsons_fuiad_0.0, ...", default="realiad_jsons")
    visa_split_csv: str = doc("VisA raw layout: split csv (split_csv/1cls.csv style)", default="")
    endpoint_url: str = doc("S3-compatible endpoint (MinIO, moto); empty = AWS_ENDPOINT_URL or AWS", default="")
    region: str = doc("S3 region; empty = AWS_DEFAULT_REGION or us-east-1", default="")
    folder_test_fraction: float = doc("folder layout: fraction of a class's good images (evenly spaced by name) "
                                      "held out as normal test images when it has defect images", default=0.2)
    max_image_pixels: int = doc("refuse images with more pixels than this (decompression-bomb guard; 0 = no limit)",
                                default=89_478_485)
    strict: bool = doc("fail on the first unreadable image instead of skipping and counting it", default=False)
    loader_workers: int = doc("CPU processes decoding images per training worker (local loop)", default=0)
    shuffle: bool = doc("shuffle training images each epoch (False = manifest order, for deterministic runs)",
                        default=True)

    def __post_init__(self) -> None:
        if self.loader_workers < 0:
            raise ValueError(f"data.loader_workers={self.loader_workers} must be >= 0")
        if not 0.0 <= self.folder_test_fraction < 1.0:
            raise ValueError(f"data.folder_test_fraction={self.folder_test_fraction} must be in [0, 1)")
        if self.max_image_pixels < 0:
            raise ValueError(f"data.max_image_pixels={self.max_image_pixels} must be >= 0 (0 = no limit)")


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation: reference values from the mvtec_uni script (spec section 3)."""

    setting: Literal["unified", "separate"] = doc(
        "'unified' = one model for all classes (multi-class); 'separate' = one model per class", default="unified")
    total_steps: int = doc("optimiser steps (iterations) in the whole run (per class when separate)",
                           default=10_000)
    batch_size: int = doc("global batch size (split evenly across workers)", default=16)
    lr: float = doc("peak learning rate of the warm-cosine schedule", default=2e-3)
    final_lr: float = doc("learning rate at the end of the cosine decay", default=2e-4)
    warmup_steps: int = doc("linear warm-up steps, from lr 0 (the first step runs at lr 0)", default=100)
    betas: list[float] = doc("StableAdamW betas", default_factory=lambda: [0.9, 0.999])
    weight_decay: float = doc("decoupled weight decay (applied to every trainable tensor)", default=1e-4)
    eps: float = doc("StableAdamW eps (1e-10 in *_uni scripts, 1e-8 in mvtec/visa/mpdd _sep)", default=1e-10)
    clip_grad_norm: float = doc("total L2 norm the gradients are clipped to", default=0.1)
    hard_mining_final_p: float = doc("fraction of easy points whose gradient is damped, after the ramp",
                                     default=0.9)
    hard_mining_ramp_steps: int = doc("steps over which p ramps linearly from 0", default=1000)
    hard_mining_factor: float = doc("gradient factor on the easy points", default=0.1)
    global_hard_mining: bool = doc("take the hard-mining threshold over the global batch across workers "
                                   "(reference semantics); False = per worker", default=True)
    seed: int = doc("random seed (reference: 1)", default=1)
    precision: Literal["fp32", "bf16"] = doc("fp32 (reference) or bf16 autocast", default="fp32")
    log_every: int = doc("log loss/lr/p every N steps", default=50)
    eval_every: int = doc("evaluate every N steps (0 = only at the end)", default=0)
    checkpoint_every: int = doc("checkpoint every N steps (0 = only at the end)", default=1000)
    num_workers: int = doc("Ray Train workers (DDP ranks)", default=1)
    use_gpu: bool = doc("one GPU per worker (NCCL); CPU workers use gloo", default=False)
    cpus_per_worker: float = doc("CPUs each Ray Train worker reserves (0 = auto: 1, or less when Ray Data needs "
                                 "a CPU left free to read images)", default=0.0)
    data_source: Literal["ray_data", "local"] = doc(
        "'ray_data' = Ray Data shards streamed to the workers; 'local' = every worker reads its slice of each "
        "global batch from the manifest itself (exact manifest order, resumable mid-epoch)", default="ray_data")
    deterministic: bool = doc("deterministic mode: manifest order (data.shuffle false, local reader), bottleneck "
                              "dropout 0, fixed seeds, deterministic torch kernels; the same on any worker count",
                              default=False)
    max_failures: int = doc("times a run restarts from its latest checkpoint after a worker or node dies",
                            default=3)
    keep_checkpoints: int = doc("checkpoints kept on storage (the latest K; 0 = keep all)", default=2)

    def __post_init__(self) -> None:
        for name in ("total_steps", "batch_size", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be at least 1")
        if self.warmup_steps < 0 or self.warmup_steps >= self.total_steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} must be in [0, train.total_steps="
                             f"{self.total_steps})")
        if self.batch_size % self.num_workers:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by train.num_workers="
                             f"{self.num_workers}; choose a batch that splits evenly across workers")
        if not 0.0 <= self.hard_mining_final_p < 1.0:
            raise ValueError(f"train.hard_mining_final_p={self.hard_mining_final_p} must be in [0, 1)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas={self.betas} must be two numbers in [0, 1)")
        if self.max_failures < 0 or self.keep_checkpoints < 0 or self.cpus_per_worker < 0:
            raise ValueError(f"train.max_failures={self.max_failures}, train.keep_checkpoints="
                             f"{self.keep_checkpoints} and train.cpus_per_worker={self.cpus_per_worker} must be >= 0")
        for name in ("log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.lr <= 0 or self.final_lr < 0:
            raise ValueError(f"train.lr={self.lr} must be > 0 and train.final_lr={self.final_lr} >= 0")


@dataclass(kw_only=True)
class EvalConfig:
    """The reference evaluation (spec section 5)."""

    resize: int = doc("maps and masks are resized to resize x resize before scoring", default=256)
    blur_kernel: int = doc("Gaussian blur kernel size (odd)", default=5)
    blur_sigma: float = doc("Gaussian blur sigma", default=4.0)
    max_ratio: float = doc("image score = mean of the top max_ratio fraction of map pixels", default=0.01)
    batch_size: int = doc("evaluation batch size", default=16)
    aupro: Literal["reference", "exact"] = doc(
        "'reference' = 200 thresholds, FPR<0.3 rescaled by the largest kept FPR; 'exact' = full curve to 0.3",
        default="reference")
    pixel_metrics: Literal["exact", "streaming"] = doc(
        "'exact' keeps every normal-pixel score of a class until its metrics are computed (the reference numbers; "
        "memory grows with the class size); 'streaming' keeps them as counts of values rounded to 20 mantissa "
        "bits (their memory stops growing with the test set; pixel metrics move by about 1e-6)", default="exact")
    actors: int = doc("model actors scoring in parallel in evaluate/predict (Ray Data ActorPoolStrategy size)",
                      default=1)
    cpus_per_actor: float = doc("CPUs each model actor reserves (also its torch thread count, rounded up)",
                                default=1.0)
    gpus_per_actor: float = doc("GPUs each model actor reserves (> 0 runs the model on CUDA)", default=0.0)

    def __post_init__(self) -> None:
        if self.actors < 1 or self.cpus_per_actor <= 0 or self.gpus_per_actor < 0:
            raise ValueError(f"eval.actors={self.actors} must be >= 1, eval.cpus_per_actor={self.cpus_per_actor} "
                             f"> 0 and eval.gpus_per_actor={self.gpus_per_actor} >= 0")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"eval.blur_kernel={self.blur_kernel} must be a positive odd number")
        if not 0.0 < self.max_ratio <= 1.0:
            raise ValueError(f"eval.max_ratio={self.max_ratio} must be in (0, 1]")
        if self.resize < 1 or self.batch_size < 1:
            raise ValueError("eval.resize and eval.batch_size must be at least 1")


@dataclass(kw_only=True)
class TrackingConfig:
    """MLflow tracking."""

    tracking_uri: str = doc("MLflow tracking URI; empty = MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db",
                            default="")
    experiment_name: str = doc("MLflow experiment", default="dinomaly")
    registered_model_name: str = doc("name in the MLflow Model Registry (empty = do not register)",
                                     default="dinomaly")
    enabled: bool = doc("log to MLflow at all", default=True)
    heatmap_images: int = doc("normal and defective test images (each) in the heatmap-overlay grid artifact",
                              default=4)
    normal_quantile: float = doc("quantile of the normal test images' scores stored as the threshold for "
                                 "unlabelled data (next to the F1-optimal one)", default=0.99)

    def __post_init__(self) -> None:
        if not 0.0 < self.normal_quantile <= 1.0:
            raise ValueError(f"tracking.normal_quantile={self.normal_quantile} must be in (0, 1]")
        if self.heatmap_images < 0:
            raise ValueError(f"tracking.heatmap_images={self.heatmap_images} must be >= 0")


@dataclass(kw_only=True)
class ServeConfig:
    """The HTTP scoring service (Ray Serve): network, batching, replicas, input limits, auth."""

    host: str = doc("address the HTTP proxy binds; 127.0.0.1 = this machine only (set 0.0.0.0 deliberately)",
                    default="127.0.0.1")
    port: int = doc("HTTP port", default=8000)
    route_prefix: str = doc("URL prefix of the app ('/' = the page at /, the API at /v1/...)", default="/")
    max_batch_size: int = doc("most images one model forward scores together (dynamic batching)", default=8)
    batch_wait_timeout_s: float = doc("longest wait for a batch to fill before scoring what has arrived",
                                      default=0.005)
    num_replicas: int = doc("model replicas (the minimum when max_replicas > num_replicas)", default=1)
    max_replicas: int = doc("autoscale between num_replicas and this many replicas (0 = fixed num_replicas)",
                            default=0)
    max_ongoing_requests: int = doc("requests one replica handles at once (>= max_batch_size so batches can fill)",
                                    default=32)
    num_cpus: float = doc("CPUs reserved per replica (also its torch thread count, rounded up)", default=1.0)
    num_gpus: float = doc("GPUs per replica (> 0 runs the model on CUDA)", default=0.0)
    max_image_bytes: int = doc("largest accepted image file in bytes (larger: HTTP 413)", default=20 * 1024 * 1024)
    max_image_pixels: int = doc("largest accepted width*height (decompression-bomb guard; larger: HTTP 413)",
                                default=50_000_000)
    max_batch_images: int = doc("most images in one /v1/predict/batch request (more: HTTP 413)", default=32)
    threshold: float | None = doc("image-score threshold of the verdict; null = from the checkpoint or registry "
                                  "metadata (F1-optimal or normal-quantile, written by training)", default=None)
    threshold_method: Literal["image_f1_optimal", "image_normal_quantile"] = doc(
        "which training threshold to serve: F1-optimal on the test split, or a quantile of normal scores "
        "(for data without defect labels)", default="image_f1_optimal")
    auth_token_env: str = doc("name of an environment variable holding a bearer token (empty = not used)",
                              default="")
    auth_token_file: str = doc("file holding a bearer token (empty = not used); with neither, no auth", default="")

    def __post_init__(self) -> None:
        for name in ("port", "max_batch_size", "num_replicas", "max_ongoing_requests", "max_image_bytes",
                     "max_image_pixels", "max_batch_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve.{name}={getattr(self, name)} must be at least 1")
        if self.port > 65535:
            raise ValueError(f"serve.port={self.port} must be a TCP port (1-65535)")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"serve.batch_wait_timeout_s={self.batch_wait_timeout_s} must be >= 0")
        if self.max_replicas and self.max_replicas < self.num_replicas:
            raise ValueError(f"serve.max_replicas={self.max_replicas} is below serve.num_replicas="
                             f"{self.num_replicas}; use 0 for a fixed count or a larger maximum")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"serve.max_ongoing_requests={self.max_ongoing_requests} is below serve.max_batch_size="
                             f"{self.max_batch_size}; a batch could never fill, raise max_ongoing_requests")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError(f"serve.num_cpus={self.num_cpus} must be > 0 and serve.num_gpus={self.num_gpus} >= 0")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"serve.threshold={self.threshold} must be a finite number or null")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"serve.route_prefix={self.route_prefix!r} must start with '/', e.g. '/' or '/dinomaly'")


def default_search_space() -> dict[str, Any]:
    """The issue's default: bottleneck dropout in [0, 0.6] and the four layer groupings of 8 target layers."""
    return {
        "model.bottleneck_dropout": "uniform(0.0, 0.6)",
        "model.fuse_groups": "choice([[0, 1, 2, 3, 4, 5, 6, 7]], [[0, 1, 2, 3], [4, 5, 6, 7]], "
                             "[[0, 1], [2, 3], [4, 5], [6, 7]], [[0], [1], [2], [3], [4], [5], [6], [7]])",
    }


SEARCH_KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
_SPEC = re.compile(r"\s*(?P<kind>[a-z]+)\s*\((?P<args>.*)\)\s*", re.DOTALL)


def parse_search_spec(key: str, spec: Any) -> tuple[str, list[Any]]:
    """'uniform(0, 0.6)' -> ('uniform', [0, 0.6]); a plain value v -> ('constant', [v]).

    Arguments are read as one YAML flow list, so choice() takes lists and mappings: choice([[0, 1]], [[0], [1]]).
    """
    match = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if match is None or match["kind"] not in SEARCH_KINDS:
        if isinstance(spec, str) and re.fullmatch(r"\s*[a-z_]+\s*\(.*", spec, re.DOTALL):
            raise ValueError(f"tune.search_space[{key!r}]={spec!r}: unknown or malformed search kind; use one of "
                             f"{', '.join(k + '(...)' for k in SEARCH_KINDS)}")
        return "constant", [spec]
    try:
        args = yaml.safe_load(f"[{match['args']}]")
    except yaml.YAMLError as err:
        raise ValueError(f"tune.search_space[{key!r}]={spec!r}: the arguments are not a YAML list ({err})") from err
    kind = match["kind"]
    args = [float(a) if isinstance(a, str) and _FLOAT.fullmatch(a) else a for a in args]  # YAML 1.1: 1e-4 is a str
    if kind in ("uniform", "loguniform", "randint"):
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ValueError(f"tune.search_space[{key!r}]={spec!r}: {kind} takes two numbers (low, high)")
        if not args[0] < args[1] or (kind == "loguniform" and args[0] <= 0):
            raise ValueError(f"tune.search_space[{key!r}]={spec!r}: need low < high (and low > 0 for loguniform)")
    elif not args:
        raise ValueError(f"tune.search_space[{key!r}]={spec!r}: {kind} needs at least one value")
    return kind, args


@dataclass(kw_only=True)
class TuneConfig:
    """Hyper-parameter search (Ray Tune): every trial is a Ray Train run of this config with sampled values.

    A trial's Train workers are train.num_workers x train.cpus_per_worker CPUs (one GPU each with
    train.use_gpu) plus tune.driver_cpus for the trial's driver function.
    """

    search_space: dict[str, Any] = doc(
        "dotted config key -> uniform(lo, hi) | loguniform(lo, hi) | randint(lo, hi) (hi excluded) | "
        "choice(v1, v2, ...) | grid(v1, v2, ...) | a plain value; values are YAML, and a mapping value sets "
        "several keys of that section together, e.g. model: choice({decoder_depth: 4, target_layers: "
        "[6, 7, 8, 9], fuse_groups: [[0, 1], [2, 3]]}, ...)", default_factory=default_search_space)
    num_samples: int = doc("trials to sample (with grid values: repeats of the whole grid)", default=8)
    search_algorithm: Literal["random", "grid", "optuna"] = doc(
        "'random' samples every spec; 'grid' runs every combination of choice()/grid() values (ranges are "
        "still sampled); 'optuna' = Optuna's TPE sampler (pip install optuna)", default="random")
    objective: Literal["auto", "labelled", "holdout_loss"] = doc(
        "'labelled' = mean of tune.metrics on the labelled test split (maximised); 'holdout_loss' = "
        "reconstruction loss on held-out normal training images (minimised, for data without defects); "
        "'auto' = labelled when the test split has defective images", default="auto")
    metrics: list[str] = doc("evaluation metrics averaged into the labelled objective (means over classes)",
                             default_factory=lambda: ["image_auroc", "pixel_aupro"])
    holdout_fraction: float = doc("holdout_loss objective: fraction of each class's training images (evenly "
                                  "spaced) held out of training in every trial", default=0.1)
    evaluations: int = doc("evaluation points per trial, evenly spaced over train.total_steps; ASHA counts "
                           "its rungs in them", default=4)
    scheduler: Literal["asha", "fifo"] = doc("'asha' stops trials that fall behind at a rung; 'fifo' runs "
                                             "every trial to the end", default="asha")
    grace_period: int = doc("ASHA: evaluations every trial gets before it can be stopped", default=1)
    reduction_factor: int = doc("ASHA: keep the best 1/reduction_factor of trials at each rung", default=2)
    max_concurrent_trials: int = doc("trials running at once (0 = as many as the cluster's CPUs/GPUs fit)",
                                     default=0)
    driver_cpus: float = doc("CPUs reserved for each trial's driver function (it only waits on its workers)",
                             default=0.1)
    feature_cache: bool = doc("compute the frozen encoder's features of every training image once and let all "
                              "trials read them (exactly the same training, less encoder work)", default=True)
    cache_root: str = doc("folder (or s3:// prefix) of feature caches; empty = <output_root>/feature_cache",
                          default="")
    max_loss: float = doc("a trial fails as diverged when its training loss exceeds this (0 = only when the "
                          "loss or gradient norm is NaN/inf)", default=0.0)
    champion_alias: str = doc("registry alias moved to the best trial's version when it beats the current "
                              "holder's stored objective (empty = register without aliasing)", default="champion")

    def __post_init__(self) -> None:
        for name in ("num_samples", "evaluations", "grace_period"):
            if getattr(self, name) < 1:
                raise ValueError(f"tune.{name}={getattr(self, name)} must be at least 1")
        if self.reduction_factor < 2:
            raise ValueError(f"tune.reduction_factor={self.reduction_factor} must be at least 2")
        if self.grace_period > self.evaluations:
            raise ValueError(f"tune.grace_period={self.grace_period} is more than tune.evaluations="
                             f"{self.evaluations}; ASHA could never stop a trial")
        if self.max_concurrent_trials < 0 or self.driver_cpus <= 0 or self.max_loss < 0:
            raise ValueError(f"tune.max_concurrent_trials={self.max_concurrent_trials} must be >= 0, "
                             f"tune.driver_cpus={self.driver_cpus} > 0 (Tune rejects 0) and "
                             f"tune.max_loss={self.max_loss} >= 0")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"tune.holdout_fraction={self.holdout_fraction} must be in (0, 1)")
        if not self.metrics:
            raise ValueError("tune.metrics is empty; name at least one, e.g. [image_auroc, pixel_aupro]")
        if not self.search_space:
            raise ValueError("tune.search_space is empty; give at least one key, e.g. "
                             "model.bottleneck_dropout: uniform(0.0, 0.6)")
        for key, spec in self.search_space.items():
            parse_search_spec(key, spec)


@dataclass(kw_only=True)
class ClusterConfig:
    """How long a job waits for the cluster's resources (CPUs, GPUs) before it fails with the holders named."""

    start_timeout_s: float = doc(
        "seconds a training run, Tune trial, evaluate/predict actor pool or Serve deployment waits for its "
        "CPUs/GPUs to become free before it fails, naming what holds them (a request larger than the "
        "cluster fails at once); 0 = wait forever", default=600.0)

    def __post_init__(self) -> None:
        if not math.isfinite(self.start_timeout_s) or self.start_timeout_s < 0:
            raise ValueError(f"cluster.start_timeout_s={self.start_timeout_s} must be a number >= 0 "
                             "(seconds; 0 = wait forever)")


@dataclass(kw_only=True)
class Config:
    """A whole run: model, data, training, evaluation, tracking, serving, tuning and cluster waits."""

    name: str = doc("run name (folder under output_root, MLflow run name)", default="dinomaly")
    output_root: str = doc("folder (or s3:// prefix) for run outputs and checkpoints", default="runs")
    model: DinomalyConfig = field(default_factory=DinomalyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# --------------------------------------------------------------------------- building and overriding


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_type(path: str, value: Any, tp: Any) -> Any:
    """Coerce a YAML value to the annotated type, or raise a ValueError naming the key."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{path}={value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(path, value, arg)
            except ValueError:
                continue
        raise ValueError(f"{path}={value!r} does not match {tp}")
    if tp is type(None):
        if value is not None:
            raise ValueError(f"{path}={value!r} must be null")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}={value!r} must be a list")
        (arg,) = typing.get_args(tp)
        return [_check_type(f"{path}[{i}]", v, arg) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{path}={value!r} must be a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{path}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}={value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}={value!r} must be a string")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys are errors that name the closest field."""
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{(path + '.') if path else ''}{close[0]}'?" if close else ""
            raise ValueError(f"unknown config key '{where}'{hint} (known: {', '.join(names)})")
        tp = hints[key]
        kwargs[key] = from_dict(tp, value, where) if _is_dataclass_type(tp) else _check_type(where, value, tp)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override '{dotted}': '{key}' is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-3' -> ('train.lr', 0.001); values are parsed as YAML (lists, numbers, booleans)."""
    if "=" not in text:
        raise ValueError(f"override '{text}' must look like section.key=value, e.g. train.total_steps=500")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip(), value


def apply_overrides(config: Config, overrides: dict[str, Any] | list[str]) -> Config:
    """Return a new validated Config with dotted-path overrides applied (used by CLI and Tune)."""
    tree = to_dict(config)
    items = [parse_override(o) for o in overrides] if isinstance(overrides, list) else list(overrides.items())
    for key, value in items:
        _set_path(tree, key, value)
    return from_dict(Config, tree)


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load a YAML preset (a path or a name in configs/, e.g. 'demo') and apply overrides."""
    tree: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file() and (CONFIG_DIR / f"{path}.yaml").exists():
            p = CONFIG_DIR / f"{path}.yaml"
        if not p.is_file():
            presets = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"config '{path}' not found; pass a YAML file or a preset: {presets}")
        tree = yaml.safe_load(p.read_text()) or {}
    config = from_dict(Config, tree)
    return apply_overrides(config, overrides or [])


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{'model.encoder': ..., 'train.lr': ...}: MLflow params and Tune search-space keys."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, key + "."))
        else:
            out[key] = value
    return out


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every field: the config part of each pipeline's --help."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            rows.extend(describe(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f"{prefix}{f.name}", f.metadata.get("doc", ""), default))
    return rows


def help_text() -> str:
    lines = ["config keys (override with --set key=value):"]
    for key, text, default in describe():
        lines.append(f"  {key} = {default!r}\n      {text}")
    return "\n".join(lines)
