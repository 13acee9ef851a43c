"""The config sections of what a training run computes and records: model, data, train, eval, tracking.

Each section is a dataclass whose fields carry their `--help` text (`doc`) and whose `__post_init__` refuses
bad values with a message that names the fix. `Config` (dinomaly.config.jobs) nests them all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

# Reference defaults per encoder size (guojiajeremy/Dinomaly dinomaly_mvtec_uni.py @c5c76d0); the paper words
# them 1-based ("[3..10]th" blocks for ViT-S/B).
REFERENCE_TARGET_LAYERS = {
    "small": [2, 3, 4, 5, 6, 7, 8, 9],
    "base": [2, 3, 4, 5, 6, 7, 8, 9],
    "large": [4, 6, 8, 10, 12, 14, 16, 18],
}


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose one-line help text becomes its `--help` entry."""
    return field(metadata={"doc": text}, **kwargs)


def check_finite(section: str, obj: Any) -> None:
    """Refuse nan and inf in every float field (or list of floats) of a config section: no key gives them a
    meaning, and a nan passes every range check below (each comparison with it is false)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            what = "finite numbers" if isinstance(value, list) else "a finite number"
            raise ValueError(f"{section}.{f.name}={value} must be {what} (not nan or inf)")


def require(ok: bool, key: str, value: Any, valid: str) -> None:
    """The one-line refusal of a value out of range: the key, its value and the valid range."""
    if not ok:
        raise ValueError(f"{key}={value} must be {valid}")


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
        check_finite("model", self)
        require(self.image_size >= 14, "model.image_size", self.image_size, "at least 14 (one patch)")
        require(self.crop_size >= 14, "model.crop_size", self.crop_size,
                "a positive multiple of the patch size 14, at most model.image_size (e.g. 112 or 392)")
        if self.crop_size % 14:
            lower, upper = self.crop_size // 14 * 14, (self.crop_size // 14 + 1) * 14
            raise ValueError(f"model.crop_size={self.crop_size} is not a multiple of the patch size 14; "
                             f"use {lower} or {upper}")
        if self.crop_size > self.image_size:
            raise ValueError(f"model.crop_size={self.crop_size} is larger than model.image_size="
                             f"{self.image_size}; the crop must fit inside the resized image")
        if not 0.0 <= self.bottleneck_dropout < 1.0:
            raise ValueError(f"model.bottleneck_dropout={self.bottleneck_dropout} must be in [0, 1)")
        require(self.attention_eps >= 0, "model.attention_eps", self.attention_eps, ">= 0 (0 = the reference)")
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
    fast_decode: bool = doc("decode JPEGs of at least 4x image_size on the short side at 1/2, 1/4 or 1/8 scale "
                            "(JPEG DCT scaling; pixels within 8/255 of a full decode, mean under 1/255); off in "
                            "train.deterministic; PNG/TIFF/BMP always decode in full", default=True)
    loader_workers: int = doc("CPU processes decoding images per training worker (local loop)", default=0)
    decode_images_per_s: float = doc(
        "images/s all training workers consume together (e.g. GPUs x their step rate); Ray Data then runs "
        "ceil(this x the read+decode seconds per image measured on the driver) decode tasks at once, at most the "
        "CPUs the training workers leave free; 0 = as many as those free CPUs", default=0.0)
    shuffle: bool = doc("shuffle training images each epoch (False = manifest order, for deterministic runs)",
                        default=True)

    def __post_init__(self) -> None:
        check_finite("data", self)
        require(self.loader_workers >= 0, "data.loader_workers", self.loader_workers, ">= 0")
        require(self.decode_images_per_s >= 0, "data.decode_images_per_s", self.decode_images_per_s,
                ">= 0 (0 = as many decode tasks as free CPUs)")
        if not 0.0 <= self.folder_test_fraction < 1.0:
            raise ValueError(f"data.folder_test_fraction={self.folder_test_fraction} must be in [0, 1)")
        if self.max_image_pixels < 0:
            raise ValueError(f"data.max_image_pixels={self.max_image_pixels} must be >= 0 (0 = no limit)")


@dataclass(kw_only=True)
class TrainConfig:
    """The optimisation: reference values from guojiajeremy/Dinomaly dinomaly_mvtec_uni.py @c5c76d0."""

    setting: Literal["unified", "separate"] = doc(
        "'unified' = one model for all classes (multi-class); 'separate' = one model per class", default="unified")
    total_steps: int = doc("optimiser steps (iterations) in the whole run (per class when separate)",
                           default=10_000)
    batch_size: int = doc("global batch size (split evenly across workers)", default=16)
    lr: float = doc("peak learning rate of the warm-cosine schedule", default=2e-3)
    final_lr: float = doc("learning rate at the end of the cosine decay (absolute, not a ratio of lr)",
                          default=2e-4)
    warmup_steps: int = doc("linear warm-up steps, from lr 0 (the first step runs at lr 0)", default=100)
    betas: list[float] = doc("StableAdamW betas", default_factory=lambda: [0.9, 0.999])
    weight_decay: float = doc("decoupled weight decay (applied to every trainable tensor)", default=1e-4)
    eps: float = doc("StableAdamW eps (1e-10 in *_uni scripts, 1e-8 in mvtec/visa/mpdd _sep)", default=1e-10)
    clip_grad_norm: float = doc("total L2 norm the gradients are clipped to", default=0.1)
    hard_mining_final_p: float = doc("fraction of easy points whose gradient is damped, after the ramp",
                                     default=0.9)
    hard_mining_ramp_steps: int = doc("steps over which p ramps linearly from 0 (0 = p is final_p from the first "
                                      "step)", default=1000)
    hard_mining_factor: float = doc("gradient factor on the easy points, in [0, 1] (1 = no hard mining)",
                                    default=0.1)
    global_hard_mining: bool = doc("take the hard-mining threshold over the global batch across workers "
                                   "(reference semantics); False = per worker", default=True)
    seed: int = doc("random seed (reference: 1)", default=1)
    precision: Literal["fp32", "bf16"] = doc("fp32 (reference) or bf16 autocast", default="fp32")
    log_every: int = doc("log loss/lr/p every N steps (0 = only the first and last step)", default=50)
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
                              "dropout 0, full JPEG decoding (data.fast_decode false), fixed seeds, deterministic "
                              "torch kernels; the same on any worker count",
                              default=False)
    max_failures: int = doc("times a run restarts from its latest checkpoint after a worker or node dies",
                            default=3)
    keep_checkpoints: int = doc("checkpoints kept on storage (the latest K; 0 = keep all)", default=2)
    keep_best: bool = doc("also keep the best-evaluated checkpoint (highest mean of tune.metrics on the test split, "
                          "at every train.eval_every step and the end) as <run>/best_checkpoint, register it beside "
                          "the last one, and let metrics.json describe it (describes: best)", default=False)
    calibration_share: float = doc(
        "share of each class's normal training images held back, never trained on, to set the per-class "
        "thresholds at eval.target_fpr (at least calibration_min_images; 0 = train on all, thresholds then come "
        "from pipelines/calibrate.py or the test split's normals)", default=0.1)
    calibration_min_images: int = doc("fewest images a class holds back; a class with fewer than twice as many "
                                      "normal training images holds none back and is named in the log",
                                      default=8)

    def __post_init__(self) -> None:
        check_finite("train", self)
        for name in ("total_steps", "batch_size", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be at least 1")
        if self.warmup_steps < 0 or self.warmup_steps >= self.total_steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} must be in [0, train.total_steps="
                             f"{self.total_steps}); lower it (--set train.warmup_steps=N, N < {self.total_steps}) or train "
                             "for more steps")
        if self.batch_size % self.num_workers:
            raise ValueError(f"train.batch_size={self.batch_size} is not divisible by train.num_workers="
                             f"{self.num_workers}; choose a batch that splits evenly across workers")
        if not 0.0 <= self.hard_mining_final_p < 1.0:
            raise ValueError(f"train.hard_mining_final_p={self.hard_mining_final_p} must be in [0, 1)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas={self.betas} must be two numbers in [0, 1)")
        for name in ("max_failures", "keep_checkpoints", "cpus_per_worker", "log_every", "eval_every",
                     "checkpoint_every", "hard_mining_ramp_steps", "weight_decay"):
            require(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), ">= 0")
        require(self.lr > 0, "train.lr", self.lr, "> 0, e.g. 0.002")
        require(self.final_lr >= 0, "train.final_lr", self.final_lr, ">= 0 (an absolute learning rate)")
        require(self.eps > 0, "train.eps", self.eps, "> 0, e.g. 1e-10 or 1e-8")
        require(self.clip_grad_norm > 0, "train.clip_grad_norm", self.clip_grad_norm,
                "> 0 (clipping to 0 would zero every gradient), e.g. 0.1")
        require(0.0 <= self.hard_mining_factor <= 1.0, "train.hard_mining_factor", self.hard_mining_factor,
                "in [0, 1] (1 = no damping), e.g. 0.1")
        require(0 <= self.seed < 2**32, "train.seed", self.seed, f"in [0, {2**32 - 1}] (numpy's seed range)")
        if not 0.0 <= self.calibration_share <= 0.5 or self.calibration_min_images < 1:
            raise ValueError(f"train.calibration_share={self.calibration_share} must be in [0, 0.5] and "
                             f"train.calibration_min_images={self.calibration_min_images} at least 1")


@dataclass(kw_only=True)
class EvalConfig:
    """The reference evaluation: guojiajeremy/Dinomaly utils.py evaluation_batch @c5c76d0."""

    resize: int = doc("maps and masks are resized to resize x resize before scoring", default=256)
    blur_kernel: int = doc("Gaussian blur kernel size (odd)", default=5)
    blur_sigma: float = doc("Gaussian blur sigma in pixels of the resized map (> 0)", default=4.0)
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
    target_fpr: float = doc("false-positive rate the per-class thresholds are set for: the share of normal "
                            "images called anomalous (score >= threshold)", default=0.01)

    def __post_init__(self) -> None:
        check_finite("eval", self)
        for name in ("actors", "resize", "batch_size"):
            require(getattr(self, name) >= 1, f"eval.{name}", getattr(self, name), "at least 1")
        require(self.cpus_per_actor > 0, "eval.cpus_per_actor", self.cpus_per_actor, "> 0")
        require(self.gpus_per_actor >= 0, "eval.gpus_per_actor", self.gpus_per_actor, ">= 0")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"eval.blur_kernel={self.blur_kernel} must be a positive odd number")
        require(self.blur_sigma > 0, "eval.blur_sigma", self.blur_sigma,
                "> 0 (a Gaussian of sigma 0 divides by zero), e.g. 4")
        if not 0.0 < self.max_ratio <= 1.0:
            raise ValueError(f"eval.max_ratio={self.max_ratio} must be in (0, 1]")
        if not 0.0 <= self.target_fpr < 1.0:
            raise ValueError(f"eval.target_fpr={self.target_fpr} must be in [0, 1), e.g. 0.01")


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
        check_finite("tracking", self)
        if not 0.0 < self.normal_quantile <= 1.0:
            raise ValueError(f"tracking.normal_quantile={self.normal_quantile} must be in (0, 1]")
        if self.heatmap_images < 0:
            raise ValueError(f"tracking.heatmap_images={self.heatmap_images} must be >= 0")

