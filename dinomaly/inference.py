"""The reference post-processing of anomaly maps and image scores; `Predictor` runs them batch by batch.

Reference: guojiajeremy/Dinomaly utils.py get_gaussian_kernel, evaluation_batch @c5c76d0. The raw map itself
(utils.py cal_anomaly_maps) belongs to the model, dinomaly.model.anomaly_map; it is re-exported here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from dinomaly.model.anomaly_map import anomaly_map_from_features

if TYPE_CHECKING:
    from dinomaly.config import EvalConfig
    from dinomaly.model.dinomaly import Dinomaly

__all__ = ["PredictResult", "Predictor", "anomaly_map_from_features", "gaussian_kernel", "image_scores",
           "postprocess", "resize_masks"]

logger = logging.getLogger(__name__)


def gaussian_kernel(kernel_size: int = 5, sigma: float = 4.0) -> torch.Tensor:
    """The reference's normalised 2-D Gaussian, [1, 1, k, k] float32, sum 1.

    Reference: utils.py get_gaussian_kernel @c5c76d0 (same float32 arithmetic, so the same weights).
    """
    coords = torch.arange(kernel_size)
    x_grid = coords.repeat(kernel_size).view(kernel_size, kernel_size)
    xy_grid = torch.stack([x_grid, x_grid.t()], dim=-1).float()
    mean = (kernel_size - 1) / 2.0
    variance = sigma ** 2.0
    kernel = (1.0 / (2.0 * math.pi * variance)) * torch.exp(
        -torch.sum((xy_grid - mean) ** 2.0, dim=-1) / (2 * variance))
    kernel = kernel / torch.sum(kernel)
    return kernel.view(1, 1, kernel_size, kernel_size)


def postprocess(maps: torch.Tensor, size: int = 256, blur_kernel: int = 5, blur_sigma: float = 4.0) -> torch.Tensor:
    """Final maps: resize raw maps [B, 1, H, W] to [B, 1, size, size], then the reference Gaussian blur.

    Reference: utils.py evaluation_batch @c5c76d0 (bilinear align_corners=False, then a depthwise Conv2d).
    """
    if maps.ndim != 4 or maps.shape[1] != 1:
        raise ValueError(f"maps must be [B, 1, H, W], got shape {tuple(maps.shape)}")
    resized = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
    kernel = gaussian_kernel(blur_kernel, blur_sigma).to(device=maps.device, dtype=maps.dtype)
    # Zero padding as in the reference Conv2d: torchvision's gaussian_blur pads by reflection and does not match.
    return F.conv2d(resized, kernel, padding=blur_kernel // 2)


def image_scores(final_maps: torch.Tensor, max_ratio: float = 0.01) -> torch.Tensor:
    """Image score [B]: mean of the top int(H*W*max_ratio) values of each final map [B, 1, H, W] or [B, H, W].

    Reference: utils.py evaluation_batch @c5c76d0 (descending sort, first k values, mean). topk returns the
    same k values in the same descending order, so the mean is bit-identical, at a fraction of a full sort's cost.
    """
    flat = final_maps.flatten(1)
    # the reference would average an empty slice (NaN) for tiny maps; keep at least the maximum
    k = max(1, int(flat.shape[1] * max_ratio))
    return torch.topk(flat, k, dim=1).values.mean(dim=1)


def resize_masks(masks: torch.Tensor, size: int = 256) -> torch.Tensor:
    """Ground-truth masks [B, C, H, W] (any numeric dtype) -> bool [B, 1, size, size].

    Nearest resize with mode='nearest' (not 'nearest-exact'), max over channels, anything > 0 is anomalous.
    Reference: utils.py evaluation_batch @c5c76d0 (resize_mask=256).
    """
    if masks.ndim != 4:
        raise ValueError(f"masks must be [B, C, H, W], got shape {tuple(masks.shape)}")
    resized = F.interpolate(masks.float(), size=(size, size), mode="nearest")
    if resized.shape[1] > 1:
        resized = resized.amax(dim=1, keepdim=True)
    return resized > 0


@dataclass
class PredictResult:
    """Output of `Predictor.predict`: scores [B] and final maps [B, size, size] (float32 numpy)."""

    scores: np.ndarray
    maps: np.ndarray
    raw_maps: np.ndarray | None = None  # [B, H, W] before resize and blur, when asked for


class Predictor:
    """Scores images with a trained model exactly as the reference evaluation does.

    Images are split into chunks of eval_config.batch_size, run under inference_mode on `device`
    (default: the model's device).
    """

    def __init__(self, model: Dinomaly, eval_config: EvalConfig, device: torch.device | str | None = None):
        self.model = model.eval()
        self.eval_config = eval_config
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model.to(self.device)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, eval_config: EvalConfig | None = None,
                        device: torch.device | str | None = None) -> Predictor:
        """Load a `dinomaly.checkpoint.save` directory; eval settings from its config unless given."""
        from dinomaly.checkpoint import load
        from dinomaly.config import Config, EvalConfig

        loaded = load(directory, device=device if device is not None else "cpu")
        if eval_config is None:
            eval_config = loaded.config.eval if isinstance(loaded.config, Config) else EvalConfig()
        return cls(loaded.model, eval_config, device=device)

    def predict_pixels(self, pixels: np.ndarray) -> PredictResult:
        """uint8 [B, crop, crop, 3] resized + cropped RGB -> `predict(normalize(pixels))`; what the exported
        model's `OnnxPredictor.predict_pixels` takes too, so callers need not know which one they hold."""
        from dinomaly.data.transforms import normalize

        return self.predict(normalize(pixels))

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, return_raw: bool = False) -> PredictResult:
        """images: [B, 3, H, W] normalised float. Returns scores [B] and final maps [B, resize, resize]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] normalised, got shape {tuple(images.shape)}")
        cfg = self.eval_config
        scores, maps, raws = [], [], []
        for chunk in torch.split(images, cfg.batch_size):
            raw = self.model.anomaly_map(chunk.to(self.device, dtype=torch.float32))  # [b, 1, H, W]
            final = postprocess(raw, size=cfg.resize, blur_kernel=cfg.blur_kernel, blur_sigma=cfg.blur_sigma)
            scores.append(image_scores(final, cfg.max_ratio).cpu())
            maps.append(final[:, 0].cpu())
            if return_raw:
                raws.append(raw[:, 0].cpu())
        return PredictResult(
            scores=torch.cat(scores).numpy(),
            maps=torch.cat(maps).float().numpy(),
            raw_maps=torch.cat(raws).float().numpy() if return_raw else None,
        )
