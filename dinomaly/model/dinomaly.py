"""Dinomaly: frozen ViT encoder, noisy bottleneck, linear-attention decoder, loose group reconstruction.

Reference: guojiajeremy/Dinomaly models/uad.py ViTill @c5c76d0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dinomaly.config import DinomalyConfig
from dinomaly.model.anomaly_map import anomaly_map_from_features
from dinomaly.model.decoder import DecoderBlock, NoisyBottleneck, init_trainable
from dinomaly.model.encoder import Encoder


def fuse(features: list[torch.Tensor]) -> torch.Tensor:
    """Plain mean of same-shaped tensors (stack, mean), as the reference's fuse_feature."""
    return torch.stack(features, dim=1).mean(dim=1)


class Dinomaly(nn.Module):
    """The whole model; `forward` returns the per-group encoder and decoder feature maps.

    Only `bottleneck` and `decoder` train (`trainable_parameters()`); the encoder is frozen and always in
    eval mode. load_encoder_weights=False skips model.encoder_weights, for callers that load a full state
    dict next (checkpoint loaders).
    """

    def __init__(self, config: DinomalyConfig, *, load_encoder_weights: bool = True):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config, load_weights=load_encoder_weights)
        dim, heads = self.encoder.embed_dim, self.encoder.num_heads
        self.bottleneck = nn.ModuleList([NoisyBottleneck(dim, config.bottleneck_dropout)])
        self.decoder = nn.ModuleList([DecoderBlock(dim, heads, attention_eps=config.attention_eps)
                                      for _ in range(config.decoder_depth)])
        init_trainable(nn.ModuleList([self.bottleneck, self.decoder]))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Bottleneck then decoder parameters: the reference optimiser's order."""
        return [*self.bottleneck.parameters(), *self.decoder.parameters()]

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """images [B, 3, S, S] normalised -> (encoder groups, decoder groups), lists of [B, D, S/p, S/p].

        Group g pairs the mean of target layers fuse_groups[g] with the mean of the same positions of the
        REVERSED decoder outputs, so the shallow encoder group meets the last decoder blocks.
        """
        height, width = images.shape[-2:]
        if height != width:
            raise ValueError(f"images must be square (the reference maps tokens to a side x side grid), got "
                             f"{height}x{width}; resize or crop to model.crop_size x model.crop_size")
        with torch.no_grad():
            encoded = self.encoder(images)  # per target layer [B, N, D], prefix tokens first
        return self.forward_from_encoder(encoded)

    def forward_from_encoder(self, encoded: list[torch.Tensor] | torch.Tensor
                             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`forward` after the frozen encoder: encoded = its target-layer outputs, a list of [B, N, D] or a
        stacked [B, L, N, D] (a feature cache, dinomaly.features), N = prefix + side * side tokens."""
        if isinstance(encoded, torch.Tensor):
            encoded = list(encoded.unbind(1))
        if len(encoded) != len(self.config.target_layers):
            raise ValueError(f"got features of {len(encoded)} encoder layers, model.target_layers has "
                             f"{len(self.config.target_layers)}; rebuild the feature cache for this model")
        prefix = self.encoder.num_prefix_tokens
        side = math.isqrt(encoded[0].shape[1] - prefix)
        if side * side != encoded[0].shape[1] - prefix:
            raise ValueError(f"encoder features have {encoded[0].shape[1]} tokens, not {prefix} prefix tokens + a "
                             "square grid; pass the encoder's own [B, N, D] outputs")
        with torch.no_grad():
            x = fuse(encoded)  # reference: cls and register tokens are fused and decoded too
        for block in self.bottleneck:
            x = block(x)
        decoded = []
        for block in self.decoder:
            x = block(x)
            decoded.append(x)
        decoded.reverse()
        groups = self.config.fuse_groups
        # drop prefix tokens before the group mean (same numbers, less work), then [B, N, D] -> [B, D, h, w]
        enc = [self._to_map(fuse([encoded[i][:, prefix:] for i in group]), side) for group in groups]
        dec = [self._to_map(fuse([decoded[i][:, prefix:] for i in group]), side) for group in groups]
        return enc, dec

    @staticmethod
    def _to_map(tokens: torch.Tensor, side: int) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)  # [B, D, h, w]

    @torch.no_grad()
    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        """Raw anomaly maps [B, 1, S, S]: mean over groups of 1 - cos, upsampled (align_corners=True).

        Runs in whatever mode the model is in; call eval() first for the reference's deterministic maps.
        """
        enc, dec = self(images)
        return anomaly_map_from_features(enc, dec, images.shape[-1])
