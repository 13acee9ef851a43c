"""The exported graph: pixels in, (image score, final map) out, with the evaluation's every step inside.

    uint8 [B, crop, crop, 3] (after the reference resize to image_size and centre crop, RGB, channels last)
      -> /255, ImageNet mean/std (dinomaly.data.transforms.normalize)
      -> Dinomaly features (dinomaly.model) -> 1 - cosine per fuse group, averaged
      -> resize to crop (align_corners=True), resize to eval.resize, Gaussian blur: ONE matrix per axis
      -> top-1 % mean (dinomaly.inference)
      -> score float32 [B], map float32 [B, eval.resize, eval.resize]

The network runs as the eager `Predictor` runs it, on a copy of the model whose encoder position table is
resampled to the crop's grid once, before tracing (the graph holds it as a constant instead of a bicubic resize
that ONNX cannot express with DINOv2's scale factor). The post-processing is the same arithmetic rearranged:
both bilinear resizes, the group mean and the zero-padded Gaussian blur are linear and act on rows and columns
separately, so the final map is S @ distance @ S.T with one [resize, grid] matrix S built here. That replaces
two full-size resizes and a 2-D convolution over resize x resize maps with two small matrix products, and the
score takes the top k with TopK(k) instead of a full sort. The export check compares the result with the eager
path, as for every other step.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinomaly.config import EvalConfig
from dinomaly.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinomaly.inference import gaussian_kernel
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


def bilinear_matrix(size_in: int, size_out: int, align_corners: bool) -> np.ndarray:
    """[size_out, size_in] float64: F.interpolate(mode='bilinear') along one axis, as a matrix."""
    out = np.arange(size_out, dtype=np.float64)
    if align_corners:
        source = out * ((size_in - 1) / (size_out - 1)) if size_out > 1 else np.zeros(size_out)
    else:
        source = np.maximum((out + 0.5) * (size_in / size_out) - 0.5, 0.0)  # torch clamps negatives to 0
    low = np.minimum(np.floor(source).astype(int), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    weight = source - low
    matrix = np.zeros((size_out, size_in))
    np.add.at(matrix, (np.arange(size_out), low), 1.0 - weight)
    np.add.at(matrix, (np.arange(size_out), high), weight)
    return matrix


def blur_matrix(size: int, kernel_size: int, sigma: float) -> np.ndarray:
    """[size, size] float64: the zero-padded Gaussian blur of dinomaly.inference along one axis."""
    kernel = gaussian_kernel(kernel_size, sigma)[0, 0].double()
    taps = (kernel.sum(dim=1) / kernel.sum()).numpy()  # the 2-D kernel is the outer product of these taps
    half = kernel_size // 2
    matrix = np.zeros((size, size))
    for offset in range(-half, half + 1):
        matrix += np.diag(np.full(size - abs(offset), taps[offset + half]), k=offset)
    return matrix


def smoothing_matrix(grid: int, crop_size: int, eval_config: EvalConfig) -> torch.Tensor:
    """[resize, grid] float32 S with final map = S @ raw grid map @ S.T (resizes and blur of Predictor)."""
    resize = eval_config.resize
    matrix = (blur_matrix(resize, eval_config.blur_kernel, eval_config.blur_sigma)
              @ bilinear_matrix(crop_size, resize, align_corners=False)
              @ bilinear_matrix(grid, crop_size, align_corners=True))
    return torch.from_numpy(matrix).float()


class ExportGraph(nn.Module):
    """uint8 pixels [B, crop, crop, 3] -> (scores [B], maps [B, resize, resize]), as `Predictor` computes them."""

    def __init__(self, model: Dinomaly, eval_config: EvalConfig):
        super().__init__()
        self.crop_size = model.config.crop_size
        self.model = fixed_size_copy(model, self.crop_size)
        grid = self.crop_size // self.model.encoder.vit.patch_embed.patch_size[0]
        self.top_k = max(1, int(eval_config.resize ** 2 * eval_config.max_ratio))  # as image_scores counts
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("smooth", smoothing_matrix(grid, self.crop_size, eval_config))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the same float32 operations in the same order as transforms.normalize
        images = (pixels.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        encoded, decoded = self.model(images)
        return scores_and_maps(encoded, decoded, self.smooth, self.top_k)


def scores_and_maps(encoded: list[torch.Tensor], decoded: list[torch.Tensor], smooth: torch.Tensor,
                    top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group feature maps [B, C, h, w] -> (scores [B], final maps [B, resize, resize]) with S = `smooth`."""
    distance = torch.stack([1 - F.cosine_similarity(enc, dec, dim=1) for enc, dec in zip(encoded, decoded)])
    final = smooth @ distance.mean(dim=0) @ smooth.T
    return torch.topk(final.flatten(1), top_k, dim=1).values.mean(dim=1), final


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
