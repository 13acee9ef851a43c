"""The config sections of the Ray jobs (serving, tuning, cluster waits) and `Config`, the whole run.

The tune section keeps its search space as plain data (dotted key -> spec text); the tune package
(dinomaly.distributed.tune.space) parses and checks it before a sweep starts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from dinomaly.config.sections import (
    DataConfig,
    DinomalyConfig,
    EvalConfig,
    TrackingConfig,
    TrainConfig,
    check_finite,
    doc,
    require,
)

MAX_SCORE = 2.0  # anomaly scores are cosine distances (1 - cosine similarity), so a threshold above never flags


@dataclass(kw_only=True)
class ServeConfig:
    """The HTTP scoring service (Ray Serve): network, batching, replicas, input limits, auth."""

    host: str = doc("address the HTTP proxy binds; 127.0.0.1 = this machine only (set 0.0.0.0 deliberately)",
                    default="127.0.0.1")
    port: int = doc("HTTP port", default=8000)
    route_prefix: str = doc("URL prefix of the app ('/' = the page at /, the API at /v1/...)", default="/")
    direct_ingress: bool = doc("each replica also serves the API on its own port on `host` (Ray's direct ingress, "
                               "ports from 30000), skipping the proxy hop: for one machine, or a load balancer that "
                               "knows the replicas; GET /v1/model and serve.py name the URL", default=False)
    max_batch_size: int = doc("most images one model forward scores together (dynamic batching)", default=8)
    batch_wait_timeout_s: float = doc("longest wait for a batch to fill before scoring what has arrived (a "
                                      "request alone in its replica is scored at once)", default=0.005)
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
    threshold: float | None = doc("image-score threshold of the verdict for classes without their own; null = the "
                                  "model's (its per-class calibration table when it has one, else the training "
                                  "threshold that threshold_method names)", default=None)
    threshold_method: Literal["image_f1_optimal", "image_normal_quantile"] = doc(
        "for a model without a per-class calibration table: which training threshold to use, F1-optimal on the "
        "test split or a quantile of normal scores (for data without defect labels)", default="image_f1_optimal")
    auth_token_env: str = doc("name of an environment variable holding a bearer token (empty = not used)",
                              default="")
    auth_token_file: str = doc("file holding a bearer token (empty = not used); with neither, no auth", default="")

    def __post_init__(self) -> None:
        check_finite("serve", self)
        for name in ("port", "max_batch_size", "num_replicas", "max_ongoing_requests", "max_image_bytes",
                     "max_image_pixels", "max_batch_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve.{name}={getattr(self, name)} must be at least 1")
        if self.port > 65535:
            raise ValueError(f"serve.port={self.port} must be a TCP port (1-65535)")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"serve.batch_wait_timeout_s={self.batch_wait_timeout_s} must be >= 0")
        require(self.max_replicas >= 0, "serve.max_replicas", self.max_replicas, ">= 0 (0 = fixed num_replicas)")
        if self.max_replicas and self.max_replicas < self.num_replicas:
            raise ValueError(f"serve.max_replicas={self.max_replicas} is below serve.num_replicas="
                             f"{self.num_replicas}; use 0 for a fixed count or a larger maximum")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"serve.max_ongoing_requests={self.max_ongoing_requests} is below serve.max_batch_size="
                             f"{self.max_batch_size}; a batch could never fill, raise max_ongoing_requests")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError(f"serve.num_cpus={self.num_cpus} must be > 0 and serve.num_gpus={self.num_gpus} >= 0")
        if self.threshold is not None and not (math.isfinite(self.threshold) and 0 < self.threshold <= MAX_SCORE):
            raise ValueError(f"serve.threshold={self.threshold} must be in (0, {MAX_SCORE:g}] or null: anomaly scores "
                             f"are cosine distances, in [0, {MAX_SCORE:g}]")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"serve.route_prefix={self.route_prefix!r} must start with '/', e.g. '/' or '/dinomaly'")


# Bottleneck dropout in [0, 0.6] and the four groupings of 8 target layers (one group, two, four pairs,
# layer to layer). Plain spec text: dinomaly.distributed.tune.space parses it.
DEFAULT_SEARCH_SPACE: dict[str, Any] = {
    "model.bottleneck_dropout": "uniform(0.0, 0.6)",
    "model.fuse_groups": "choice([[0, 1, 2, 3, 4, 5, 6, 7]], [[0, 1, 2, 3], [4, 5, 6, 7]], "
                         "[[0, 1], [2, 3], [4, 5], [6, 7]], [[0], [1], [2], [3], [4], [5], [6], [7]])",
}


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
        "[6, 7, 8, 9], fuse_groups: [[0, 1], [2, 3]]}, ...)", default_factory=lambda: dict(DEFAULT_SEARCH_SPACE))
    num_samples: int = doc("trials to sample (with grid values: repeats of the whole grid)", default=8)
    search_algorithm: Literal["random", "grid", "optuna"] = doc(
        "'random' samples every spec; 'grid' runs every combination of choice()/grid() values (ranges are "
        "still sampled); 'optuna' = Optuna's TPE sampler", default="random")
    seed: int = doc("seeds every search algorithm (random samples, the grid's sampled ranges, Optuna): the same "
                    "seed and config sample the same trials in the same order", default=0)
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
        check_finite("tune", self)
        require(0 <= self.seed < 2**32, "tune.seed", self.seed, f"in [0, {2**32 - 1}] (numpy's seed range)")
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


@dataclass(kw_only=True)
class ClusterConfig:
    """How long a job waits for the cluster's resources (CPUs, GPUs) before it fails with the holders named."""

    start_timeout_s: float = doc(
        "seconds a training run, Tune trial, evaluate/predict actor pool or Serve deployment waits for its "
        "CPUs/GPUs to become free before it fails, naming what holds them (a request larger than the "
        "cluster fails at once); 0 = wait forever", default=600.0)

    def __post_init__(self) -> None:
        check_finite("cluster", self)
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

    def __post_init__(self) -> None:
        # the name becomes one folder under output_root: '../x', 'a/b' or '' would write elsewhere
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"name={self.name!r} must be one folder name: letters, digits, '.', '_' and '-', "
                             "not starting with '.'; e.g. --name mvtec-try2")

