"""The exported graph: pixels in, (image score, final map) out, with the evaluation's every step inside.

    uint8 [B, crop, crop, 3] (after the reference resize to image_size and centre crop, RGB, channels last)
      -> /255, ImageNet mean/std (dinomaly.data.transforms.normalize)
      -> Dinomaly raw map (dinomaly.model) -> resize + Gaussian blur -> top-1 % mean (dinomaly.inference)
      -> score float32 [B], map float32 [B, eval.resize, eval.resize]

Every step calls the same core function the eager `Predictor` calls; the only change is made on a copy of the
model: the encoder's position table is resampled to the crop's grid once, before tracing, so the graph holds the
resampled table as a constant instead of a bicubic resize that ONNX cannot express with DINOv2's scale factor.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from dinomaly.config import EvalConfig
from dinomaly.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinomaly.inference import image_scores, postprocess
from dinomaly.model.anomaly_map import anomaly_map_from_features
from dinomaly.model.dinomaly import Dinomaly
from dinomaly.model.encoder import interpolate_patch_pos_embed

INPUT_NAME, OUTPUT_NAMES = "image", ("score", "map")
OPSET = 18


def fixed_size_copy(model: Dinomaly, crop_size: int) -> Dinomaly:
    """A copy of `model` whose position table is already resampled to crop_size (same numbers, no resize op)."""
    fixed = copy.deepcopy(model).eval()
    vit = fixed.encoder.vit
    patch = vit.patch_embed.patch_size[0]
    if crop_size % patch:
        raise ValueError(f"model.crop_size={crop_size} is not a multiple of the patch size {patch}; "
                         "fix the checkpoint's config before exporting")
    if vit.pos_embed is None:
        return fixed
    size = (crop_size // patch, crop_size // patch)
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens  # prefix positions are never resampled
    table = vit.pos_embed.detach()
    resampled = interpolate_patch_pos_embed(table[:, prefix:], vit.patch_embed.grid_size, size)
    vit.pos_embed = nn.Parameter(torch.cat((table[:, :prefix], resampled), dim=1), requires_grad=False)
    vit.patch_embed.grid_size = size  # the encoder now finds the table at its native size and uses it as is
    return fixed


class ExportGraph(nn.Module):
    """uint8 pixels [B, crop, crop, 3] -> (scores [B], maps [B, resize, resize]), as `Predictor` computes them."""

    def __init__(self, model: Dinomaly, eval_config: EvalConfig):
        super().__init__()
        self.crop_size = model.config.crop_size
        self.model = fixed_size_copy(model, self.crop_size)
        self.eval_config = eval_config
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the same float32 operations in the same order as transforms.normalize
        images = (pixels.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        encoded, decoded = self.model(images)
        raw = anomaly_map_from_features(encoded, decoded, self.crop_size)
        cfg = self.eval_config
        final = postprocess(raw, size=cfg.resize, blur_kernel=cfg.blur_kernel, blur_sigma=cfg.blur_sigma)
        return image_scores(final, cfg.max_ratio), final[:, 0]


def trace_onnx(model: Dinomaly, eval_config: EvalConfig, path: Path) -> Path:
    """Trace `model` with its pre- and post-processing into an ONNX file at `path` (batch size dynamic)."""
    graph = ExportGraph(model, eval_config).eval()
    crop = graph.crop_size
    example = torch.zeros((2, crop, crop, 3), dtype=torch.uint8)
    batch = {0: "batch"}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # the model's shape checks are Python branches; the tracer warns about each, and they hold for any batch
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_axes={INPUT_NAME: batch, OUTPUT_NAMES[0]: batch, OUTPUT_NAMES[1]: batch},
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return path
