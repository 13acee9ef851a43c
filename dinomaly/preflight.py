"""Checks a driver runs before it starts any worker: the model builds and the weight files are weights.

A worker finds these mistakes only after the cluster, the data pipeline and the model are up (a minute and a
long traceback later); here each is one ValueError or OSError naming the fix, in well under a
second and without downloading anything: the model is built on PyTorch's meta device (shapes, no memory, no
weights) and weight files are opened for their tensor names only.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

from dinomaly.config import DinomalyConfig
from dinomaly.config.paths import ENCODER_WEIGHT_WORDS

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")
logger = logging.getLogger(__name__)


def check_model_builds(config: DinomalyConfig) -> None:
    """The configured model builds: a timm encoder name (close names suggested), encoder_kwargs timm takes,
    target_layers within the encoder's depth, a decoder that fits. Nothing is downloaded or allocated."""
    import torch

    from dinomaly.model.dinomaly import Dinomaly

    try:
        with torch.device("meta"):
            Dinomaly(config, load_encoder_weights=False)
    except TypeError as err:  # timm passes unknown encoder_kwargs on to the model class
        raise ValueError(f"model.encoder={config.encoder!r} refuses model.encoder_kwargs="
                         f"{config.encoder_kwargs} ({err}); fix or drop those arguments") from err
    except (RuntimeError, NotImplementedError) as err:  # an init that needs real tensors: the worker builds it
        logger.debug("model not checked on the meta device: %s", err)


def check_encoder_weights(value: str) -> None:
    """model.encoder_weights is 'hub', 'none' or an existing weights file (.pth/.pt/.safetensors)."""
    if value in ENCODER_WEIGHT_WORDS:
        return  # a URI is refused below: the encoder reads local files only
    path = Path(value).expanduser()
    if not path.exists():
        close = difflib.get_close_matches(value, ENCODER_WEIGHT_WORDS, n=1)
        hint = f"did you mean '{close[0]}'? " if close and "/" not in value and not path.suffix else ""
        raise FileNotFoundError(f"model.encoder_weights={value!r} is neither 'hub', 'none' nor an existing file; "
                                f"{hint}pass a DINOv2 .pth or timm .safetensors/.pth path")
    check_weights_file(path, "model.encoder_weights")


def check_weights_source(value: str, flag: str = "--init-from") -> None:
    """A checkpoint folder written by pipelines/train.py (model.safetensors + config.json) or a weights file."""
    from dinomaly.checkpoint import CONFIG_FILE, MODEL_FILE

    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{flag} {value} does not exist; give an official Dinomaly .pth or a checkpoint "
                                "folder written by pipelines/train.py (e.g. runs/<name>/checkpoint)")
    if path.is_file():
        check_weights_file(path, flag)
        return
    if (path / MODEL_FILE).is_file() and (path / CONFIG_FILE).is_file():
        return
    inside = sorted(p.name for p in path.iterdir() if (p / MODEL_FILE).is_file() and (p / CONFIG_FILE).is_file())
    example = "checkpoint" if "checkpoint" in inside else (inside or [""])[-1]
    hint = f"; did you mean {value.rstrip('/')}/{example}?" if example else ""
    raise ValueError(f"{flag} {value} is a folder without {MODEL_FILE} and {CONFIG_FILE}, so not a checkpoint "
                     f"folder written by pipelines/train.py{hint}")


def check_weights_file(path: Path, what: str) -> None:
    """path is a .pth/.pt/.safetensors file whose tensors can be listed (read on the meta device)."""
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{what} {path} is not a weights file ({' / '.join(WEIGHT_SUFFIXES)}); give a "
                         ".pth or .safetensors file, or a checkpoint folder written by pipelines/train.py")
    if not _tensor_names(path):
        raise ValueError(f"{what} {path} holds no tensors; give a weights file (a state dict)")


def _tensor_names(path: Path) -> list[str]:
    import torch
    from safetensors import SafetensorError, safe_open

    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
    try:
        try:
            state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="meta", weights_only=True)  # the pre-zip torch.save format
    except Exception as err:  # noqa: BLE001 -- bad bytes fail inside the unpickler with any error type
        raise ValueError(f"{path} is not a weights file torch.load(weights_only=True) reads "
                         f"({type(err).__name__}); give a state dict saved with torch.save or a .safetensors "
                         "file") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict (name -> tensor)")
    return [key for key, tensor in state.items() if isinstance(tensor, torch.Tensor)]


def check_writable_folder(folder: Path, what: str, fix: str) -> None:
    """folder is a writable folder, or the nearest part of it that exists is (the rest is created later)."""
    from dinomaly.data.storage import unwritable_part

    blocking = unwritable_part(folder)
    if blocking is not None:
        raise PermissionError(f"cannot write {what} under {folder} ({blocking} is not a writable folder); {fix}")


def check_tracking_store(tracking_uri: str) -> None:
    """MLflow has a tracking and a registry store for this URI (its scheme and driver; no server is contacted,
    and a sqlite file is left to be created by the run)."""
    if tracking_uri.startswith("sqlite:///"):
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(tracking_uri=tracking_uri)
    except (MlflowException, ImportError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(" See http")[0]
        raise ValueError(f"tracking.tracking_uri={tracking_uri!r} is not a store MLflow can open ({reason}); use "
                         "sqlite:///<path>/mlflow.db or http://host:port, or --set tracking.enabled=false") from err
