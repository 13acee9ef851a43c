"""The frozen encoder: a timm ViT tapped at the target blocks, positions interpolated the DINOv2 way.

Reference: guojiajeremy/Dinomaly models/vit_encoder.py + dinov2/models/vision_transformer.py @c5c76d0.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from dinomaly.config import REFERENCE_TARGET_LAYERS
from dinomaly.model.state_dict import check_state_dict, load_strict, read_state_dict

if TYPE_CHECKING:
    from dinomaly.config import DinomalyConfig

logger = logging.getLogger(__name__)

DINOV2_INTERPOLATE_OFFSET = 0.1
_WEIGHTS_HINT = "check model.encoder and model.encoder_kwargs against the weights file"


def interpolate_patch_pos_embed(patch_pos: torch.Tensor, grid: tuple[int, int],
                                size: tuple[int, int]) -> torch.Tensor:
    """Resample patch position embeddings [1, gh*gw, D] to [1, h*w, D] exactly as DINOv2 does.

    Bicubic without antialias, called with scale_factor (n + 0.1) / grid rather than size=(n, n): PyTorch then
    maps output to input coordinates with grid / (n + 0.1), which moves every value (vs size=(n, n)).
    Reference: dinov2/models/vision_transformer.py interpolate_pos_encoding (interpolate_offset=0.1).
    """
    (gh, gw), (h, w) = grid, size
    if (h, w) == (gh, gw):
        return patch_pos  # DINOv2 returns the table untouched at its native size
    dim = patch_pos.shape[-1]
    table = patch_pos.float().reshape(1, gh, gw, dim).permute(0, 3, 1, 2)  # [1, D, gh, gw]
    scale = ((h + DINOV2_INTERPOLATE_OFFSET) / gh, (w + DINOV2_INTERPOLATE_OFFSET) / gw)
    table = F.interpolate(table, scale_factor=scale, mode="bicubic", antialias=False)  # [1, D, h, w]
    return table.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(patch_pos.dtype)


class DinoV2PositionViT(VisionTransformer):
    """timm's VisionTransformer with DINOv2's position-embedding interpolation instead of timm's resampling.

    timm resamples to size=(n, n) with antialias, ~2-3 % away from the official block outputs. Prefix tokens
    are handled as timm stores them: for no_embed_class models (DINOv2 with registers) the class token already
    holds its position (timm folds pos_embed[0] into it) and registers get none.
    """

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        batch, h, w, dim = x.shape  # NHWC: built with dynamic_img_size=True
        x = x.reshape(batch, h * w, dim)
        prefix = [t.expand(batch, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        pos_embed = self.pos_embed
        if pos_embed is None:  # e.g. RoPE ViTs: nothing to add
            return self.pos_drop(torch.cat(prefix + [x], dim=1))
        if self.no_embed_class:
            patch_pos = interpolate_patch_pos_embed(pos_embed, self.patch_embed.grid_size, (h, w))
            x = torch.cat(prefix + [x + patch_pos.to(x.dtype)], dim=1)
        else:
            n = self.num_prefix_tokens
            patch_pos = interpolate_patch_pos_embed(pos_embed[:, n:], self.patch_embed.grid_size, (h, w))
            x = torch.cat(prefix + [x], dim=1) + torch.cat((pos_embed[:, :n], patch_pos), dim=1).to(x.dtype)
        return self.pos_drop(x)


def _check_encoder_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models("vit_*"), n=3)
        raise ValueError(f"model.encoder={name!r} is not a timm model name; close matches: {close or 'none'} "
                         "(e.g. vit_base_patch14_reg4_dinov2)")


def _create(config: DinomalyConfig, pretrained: bool) -> nn.Module:
    # dynamic_img_size: any input that is a multiple of the patch size; the table stays e.g. 37x37 at 518
    return timm.create_model(config.encoder, pretrained=pretrained,
                             **dict(config.encoder_kwargs, dynamic_img_size=True))


def _with_dinov2_positions(vit: nn.Module, name: str) -> DinoV2PositionViT:
    if type(vit) is not VisionTransformer:
        raise ValueError(f"model.encoder={name!r} builds a timm {type(vit).__name__}; only plain "
                         "VisionTransformer models (e.g. vit_base_patch14_reg4_dinov2) are supported")
    vit.__class__ = DinoV2PositionViT  # same parameters and names, only the position step differs
    return vit


def build_vit(config: DinomalyConfig) -> DinoV2PositionViT:
    """timm.create_model(config.encoder, **config.encoder_kwargs), random weights, DINOv2 positions."""
    _check_encoder_name(config.encoder)
    return _with_dinov2_positions(_create(config, pretrained=False), config.encoder)


def build_hub_vit(config: DinomalyConfig) -> DinoV2PositionViT:
    """The encoder with timm's pretrained weights; any download failure becomes one actionable error."""
    _check_encoder_name(config.encoder)
    try:
        vit = _create(config, pretrained=True)
    except Exception as err:  # noqa: BLE001 -- hub/network errors come in many types (OSError, httpx, hf_hub)
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"model.encoder_weights='hub': could not load timm's pretrained weights for {config.encoder!r} "
            f"({type(err).__name__}: {first_line}). No network? Download the weights elsewhere (a Meta "
            "DINOv2 .pth such as dinov2_vitb14_reg4_pretrain.pth, or timm's model.safetensors) and pass the "
            "local file with model.encoder_weights=/path/to/file"
        ) from err
    logger.info("encoder weights: timm pretrained %s", config.encoder)
    return _with_dinov2_positions(vit, config.encoder)


def dinov2_layout(vit: VisionTransformer) -> dict[str, torch.Size]:
    """Key -> shape of a Meta DINOv2 checkpoint for this model: the inverse of timm's _convert_dinov2."""
    layout = {"mask_token": torch.Size((1, vit.embed_dim))}
    for key, value in vit.state_dict().items():
        if key == "reg_token":
            layout["register_tokens"] = value.shape
        elif key == "pos_embed" and vit.reg_token is not None:
            layout[key] = torch.Size((1, value.shape[1] + 1, value.shape[2]))  # + the class position
        else:
            layout[key] = value.shape
    return layout


def load_vit_state_dict(vit: VisionTransformer, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load a Meta DINOv2 or timm state dict strictly, converted by timm's checkpoint_filter_fn."""
    if "mask_token" in state_dict:
        # check under DINOv2 names first: timm's filter would silently resample a wrongly sized pos_embed
        check_state_dict(dinov2_layout(vit), state_dict, source, _WEIGHTS_HINT)
    converted = checkpoint_filter_fn(dict(state_dict), vit)  # the filter pops keys: give it a copy
    load_strict(vit, converted, source, _WEIGHTS_HINT)


def load_encoder_weights(vit: VisionTransformer, weights: str) -> None:
    """model.encoder_weights='none' or a path (a Meta DINOv2 .pth, a timm .safetensors/.pth)."""
    if weights == "none":
        logger.warning("model.encoder_weights='none': the encoder keeps RANDOM weights, so anomaly maps on "
                       "real images will be poor (fine for tests and demos)")
        return
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.encoder_weights={weights!r} is neither 'hub', 'none' nor an existing "
                                "file; pass a DINOv2 .pth or timm .safetensors/.pth path")
    state_dict = read_state_dict(path)
    if "encoder.cls_token" in state_dict:
        raise ValueError(f"{path} is a whole Dinomaly checkpoint (encoder.* keys); load it with "
                         "dinomaly.checkpoint.load_official instead of model.encoder_weights")
    load_vit_state_dict(vit, state_dict, str(path))
    logger.info("encoder weights loaded from %s", path)


class Encoder(nn.Module):
    """Frozen timm ViT returning the full token sequences [B, N, D] of the target blocks.

    Tokens keep the reference order [cls, reg1..reg4, patches]. The encoder never trains: its parameters do
    not require grad and it stays in eval mode whatever `train()` is asked.
    Reference: models/uad.py ViTill.forward encoder loop @c5c76d0.
    """

    def __init__(self, config: DinomalyConfig, load_weights: bool = True):
        super().__init__()
        if load_weights and config.encoder_weights == "hub":
            self.vit = build_hub_vit(config)
        else:
            self.vit = build_vit(config)
            if load_weights:
                load_encoder_weights(self.vit, config.encoder_weights)
        depth = len(self.vit.blocks)
        if max(config.target_layers) >= depth:
            default = REFERENCE_TARGET_LAYERS["large" if depth >= 24 else "base"]
            raise ValueError(f"model.target_layers={config.target_layers} uses block "
                             f"{max(config.target_layers)} but {config.encoder!r} has {depth} blocks "
                             f"(0-{depth - 1}); choose layers below {depth} (reference: {default})")
        self.target_layers = list(config.target_layers)
        self.requires_grad_(False)
        self.train(False)

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def num_heads(self) -> int:
        return self.vit.blocks[0].attn.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    def train(self, mode: bool = True) -> Encoder:
        return super().train(False)  # frozen feature extractor: always eval

    def check_images(self, images: torch.Tensor) -> None:
        """ValueError unless images are [B, C, H, W] with the encoder's C and H, W multiples of the patch."""
        in_chans = self.vit.patch_embed.proj.in_channels
        if images.ndim != 4 or images.shape[1] != in_chans:
            raise ValueError(f"images must be [B, {in_chans}, H, W] (normalised RGB), got shape "
                             f"{tuple(images.shape)}; convert grey or RGBA images to RGB first")
        patch = self.patch_size
        height, width = images.shape[-2:]
        if height % patch or width % patch:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch}; "
                             f"resize or crop to e.g. {max(patch, height // patch * patch)} px "
                             "(model.crop_size)")

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [B, C, H, W] -> one [B, prefix + H/p * W/p, D] tensor per target layer."""
        self.check_images(images)
        outputs = self.vit.forward_intermediates(
            images, indices=self.target_layers, return_prefix_tokens=True, norm=False, stop_early=True,
            output_fmt="NLC", intermediates_only=True)
        if not self.num_prefix_tokens:
            return list(outputs)
        return [torch.cat((prefix, patches), dim=1) for patches, prefix in outputs]
