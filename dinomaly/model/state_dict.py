"""Strict state-dict checks shared by the encoder weight loader and the checkpoint loaders.

torch's `load_state_dict(strict=True)` stops at the first size mismatch with a RuntimeError; these helpers
list every missing, unexpected and mis-shaped key at once, as a ValueError that says what to fix.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

_SHOWN = 20  # keys listed per kind of problem; the rest are counted


def _listing(title: str, lines: list[str]) -> str:
    shown = lines[:_SHOWN]
    more = f"\n    ... and {len(lines) - _SHOWN} more" if len(lines) > _SHOWN else ""
    return f"  {title} ({len(lines)}):\n    " + "\n    ".join(shown) + more


def check_state_dict(expected: Mapping[str, torch.Size], given: Mapping[str, torch.Tensor], source: str,
                     hint: str) -> None:
    """Raise a ValueError naming every missing, unexpected and wrongly shaped key of `given`.

    expected: key -> shape the model needs; given: the tensors read from `source` (for the message).
    """
    missing = [f"{k} {tuple(shape)}" for k, shape in expected.items() if k not in given]
    unexpected = [f"{k} {tuple(getattr(v, 'shape', ()))}" for k, v in given.items() if k not in expected]
    mismatched = [
        f"{k}: file {tuple(getattr(given[k], 'shape', ()))} vs model {tuple(shape)}"
        for k, shape in expected.items()
        if k in given and getattr(given[k], "shape", None) != shape
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{source} does not match the model ({len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(mismatched)} wrongly shaped keys); {hint}"]
    if missing:
        parts.append(_listing("missing", missing))
    if unexpected:
        parts.append(_listing("unexpected", unexpected))
    if mismatched:
        parts.append(_listing("wrong shape", mismatched))
    raise ValueError("\n".join(parts))


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, hint: str) -> None:
    """`module.load_state_dict(state_dict, strict=True)` after a full key and shape check."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(expected, state_dict, source, hint)
    module.load_state_dict(state_dict, strict=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .pth/.pt file read with weights_only=True (never unpickles)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except SafetensorError as err:
            raise ValueError(f"{path} is not a valid safetensors file ({err})") from err
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a plain tensor state dict that torch.load(weights_only=True) "
                         "accepts; arbitrary pickles are refused. Re-save it as a dict of tensors or as "
                         f".safetensors ({type(err).__name__})") from err
    except Exception as err:  # corrupt or truncated bytes fail inside the unpickler with any error type
        raise ValueError(f"{path} is not a readable weights file (corrupt or truncated: {type(err).__name__}); "
                         "download or copy it again") from err
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict (name -> tensor)")
    return dict(state_dict)
