"""The model's raw anomaly map: per fuse group 1 - cosine between encoder and decoder features, averaged.

Reference: guojiajeremy/Dinomaly utils.py cal_anomaly_maps @c5c76d0 (bilinear, align_corners=True). The model
owns it (Dinomaly.anomaly_map); dinomaly.inference post-processes it into final maps and image scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def anomaly_map_from_features(encoder_features: Sequence[torch.Tensor], decoder_features: Sequence[torch.Tensor],
                              size: int | tuple[int, int]) -> torch.Tensor:
    """Raw anomaly map: per fuse group 1 - cosine over channels, upsampled, mean over groups.

    encoder_features / decoder_features: one [B, C, h, w] tensor per group. Returns [B, 1, size, size].
    """
    if len(encoder_features) != len(decoder_features) or not encoder_features:
        raise ValueError(f"need one decoder group per encoder group, got {len(encoder_features)} encoder and "
                         f"{len(decoder_features)} decoder groups")
    out_size = (size, size) if isinstance(size, int) else tuple(size)
    group_maps = []
    for enc, dec in zip(encoder_features, decoder_features):
        distance = 1 - F.cosine_similarity(enc, dec, dim=1).unsqueeze(1)  # [B, 1, h, w]
        group_maps.append(F.interpolate(distance, size=out_size, mode="bilinear", align_corners=True))
    return torch.cat(group_maps, dim=1).mean(dim=1, keepdim=True)  # [B, 1, size, size]
