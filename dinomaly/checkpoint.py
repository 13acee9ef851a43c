"""Checkpoints without pickle: tensors in safetensors, everything else in JSON; plus official weight import.

A checkpoint directory (what `save` writes, what Ray Train reports and MLflow logs):
    model.safetensors      full model state dict (encoder included, so no weight download is needed to load)
    config.json            the Config (or DinomalyConfig) as a plain dict (load_config accepts it)
    train_state.json       optional nested training state with tensors replaced by references ...
    train_state.safetensors  ... to the tensors stored here
    metadata.json          free-form JSON (step, metrics, git SHA, ...)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dinomaly.config import Config, DinomalyConfig, from_dict, to_dict
from dinomaly.model.dinomaly import Dinomaly
from dinomaly.model.encoder import dinov2_layout, load_vit_state_dict
from dinomaly.model.state_dict import check_state_dict, load_strict, read_state_dict

FORMAT = "dinomaly-checkpoint/1"
MODEL_FILE, CONFIG_FILE, METADATA_FILE = "model.safetensors", "config.json", "metadata.json"
STATE_JSON, STATE_TENSORS = "train_state.json", "train_state.safetensors"
_OFFICIAL_HINT = ("the config must describe the checkpoint's architecture: check model.encoder, "
                  "model.encoder_kwargs (embed_dim, depth, num_heads) and model.decoder_depth")


@dataclass
class Loaded:
    """What `load` returns: the model (eval mode, on the requested device) and everything saved with it."""

    model: Dinomaly
    config: Config | DinomalyConfig
    train_state: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- nested state <-> JSON + tensors


def _encode(value: Any, tensors: dict[str, torch.Tensor], seen: dict[int, str], storages: set[int],
            where: str) -> Any:
    """JSON-able form of a nested value; tensors go to `tensors` and are referenced by name.

    Dicts become {"__dict__": [[key, value], ...]} (keeps int keys and order), tuples {"__tuple__": [...]},
    tensors {"__tensor__": name}; the same tensor object twice is stored once.
    """
    if isinstance(value, torch.Tensor):
        if id(value) not in seen:
            tensor = value.detach().to("cpu").contiguous()
            pointer = tensor.untyped_storage().data_ptr()
            if tensor.numel() and pointer in storages:
                tensor = tensor.clone()  # safetensors refuses tensors that share memory
            storages.add(tensor.untyped_storage().data_ptr())
            seen[id(value)] = f"t{len(tensors)}"
            tensors[seen[id(value)]] = tensor
        return {"__tensor__": seen[id(value)]}
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise ValueError(f"train_state{where} has a key of type {type(key).__name__}; keys must be "
                                 "str, int, float, bool or None")
            items.append([key, _encode(item, tensors, seen, storages, f"{where}[{key!r}]")])
        return {"__dict__": items}
    if isinstance(value, (list, tuple)):
        encoded = [_encode(v, tensors, seen, storages, f"{where}[{i}]") for i, v in enumerate(value)]
        return {"__tuple__": encoded} if isinstance(value, tuple) else encoded
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ValueError(f"train_state{where} is a {type(value).__name__}; a checkpoint stores only tensors, "
                     "str, int, float, bool, None, lists, tuples and dicts (convert it, e.g. .tolist())")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        return {key: _decode(item, tensors) for key, item in value["__dict__"]}
    return value


def _write_json(path: Path, value: Any, what: str) -> None:
    try:
        text = json.dumps(value, indent=1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} is not JSON-serialisable ({err}); pass only str, numbers, bools, lists "
                         "and dicts") from err
    path.write_text(text + "\n")


# --------------------------------------------------------------------------- save / load


def save(directory: str | Path, model: Dinomaly, config: Config | DinomalyConfig,
         train_state: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory (created if needed); returns its path. Never pickles.

    train_state: any nested dict of tensors/ints/floats/str/bools/None/lists/tuples (e.g. an optimizer
    state_dict); it loads back equal, int dict keys and tuples included.
    """
    if not isinstance(config, (Config, DinomalyConfig)):
        raise ValueError(f"config must be a Config or DinomalyConfig, got {type(config).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(weights, directory / MODEL_FILE, metadata={"format": FORMAT})
    _write_json(directory / CONFIG_FILE, to_dict(config), "config")
    _write_json(directory / METADATA_FILE, metadata or {}, "metadata")
    for name in (STATE_JSON, STATE_TENSORS):
        (directory / name).unlink(missing_ok=True)  # never leave a stale state from an earlier save
    if train_state is not None:
        tensors: dict[str, torch.Tensor] = {}
        tree = _encode(train_state, tensors, {}, set(), "")
        save_file(tensors, directory / STATE_TENSORS, metadata={"format": FORMAT})
        _write_json(directory / STATE_JSON, tree, "train_state")
    return directory


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as err:
        raise ValueError(f"{path} is not a safetensors file ({err}); checkpoints are never unpickled, "
                         "re-create it with dinomaly.checkpoint.save") from err


def _read_config(path: Path) -> Config | DinomalyConfig:
    data = json.loads(path.read_text())
    return from_dict(Config, data) if "model" in data else from_dict(DinomalyConfig, data)


def load(directory: str | Path, device: str | torch.device = "cpu") -> Loaded:
    """Read a `save` directory: model (eval mode, on `device`), config, train_state (or None), metadata."""
    directory = Path(directory)
    if directory.is_file():
        raise ValueError(f"{directory} is a file; load() reads a checkpoint directory written by "
                         "dinomaly.checkpoint.save and never unpickles .pth/.pt files. For an official "
                         "Dinomaly .pth use dinomaly.checkpoint.load_official(path, config)")
    if not (directory / CONFIG_FILE).is_file() or not (directory / MODEL_FILE).is_file():
        found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else "directory missing"
        raise FileNotFoundError(f"{directory} is not a checkpoint directory: needs {MODEL_FILE} and "
                                f"{CONFIG_FILE} (found: {found})")
    config = _read_config(directory / CONFIG_FILE)
    model_config = config.model if isinstance(config, Config) else config
    model = Dinomaly(model_config, load_encoder_weights=False)  # all weights come from the file
    load_strict(model, _read_safetensors(directory / MODEL_FILE), str(directory / MODEL_FILE),
                "the weights do not fit config.json; was the directory assembled from two runs?")
    train_state = None
    if (directory / STATE_JSON).is_file():
        tensors = _read_safetensors(directory / STATE_TENSORS)
        train_state = _decode(json.loads((directory / STATE_JSON).read_text()), tensors)
    metadata_path = directory / METADATA_FILE
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    return Loaded(model=model.to(device).eval(), config=config, train_state=train_state, metadata=metadata)


# --------------------------------------------------------------------------- official checkpoints


def load_official(source: str | Path | Mapping[str, torch.Tensor], config: DinomalyConfig) -> Dinomaly:
    """A Dinomaly model from an official ViTill state dict (what the reference's torch.save writes).

    Keys: `encoder.*` (Meta DINOv2 layout, converted by timm's checkpoint_filter_fn), `bottleneck.0.*`,
    `decoder.K.*`. Strict: every key and shape is checked first, and all problems are reported in one
    ValueError. A path is read with torch.load(weights_only=True) (or as .safetensors). Returns train mode.
    """
    if isinstance(source, Mapping):
        state_dict, name = dict(source), "the official state dict"
    else:
        state_dict, name = read_state_dict(source), str(source)
    model = Dinomaly(config, load_encoder_weights=False)
    trainable = nn.ModuleDict({"bottleneck": model.bottleneck, "decoder": model.decoder})
    expected = {f"encoder.{k}": shape for k, shape in dinov2_layout(model.encoder.vit).items()}
    expected.update({k: v.shape for k, v in trainable.state_dict().items()})
    check_state_dict(expected, state_dict, name, _OFFICIAL_HINT)
    prefix = "encoder."
    load_vit_state_dict(model.encoder.vit, {k[len(prefix):]: v for k, v in state_dict.items()
                                            if k.startswith(prefix)}, name)
    rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    load_strict(trainable, rest, name, _OFFICIAL_HINT)
    return model


