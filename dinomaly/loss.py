"""The hard-mining global cosine loss (paper Eq. 5) and its p schedule.

Reference: utils.py global_cosine_hm_percent @c5c76d0 and the p ramp of dinomaly_mvtec_uni.py train().
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def hard_mining_p(step: int, final_p: float = 0.9, ramp_steps: int = 1000) -> float:
    """Fraction p of easy points whose gradient is damped at 0-based `step`: a linear ramp from 0.

    Reference: dinomaly_mvtec_uni.py `p = min(0.9 * it / 1000, 0.9)` (same operation order).
    """
    if ramp_steps <= 0:
        return final_p
    return min(final_p * step / ramp_steps, final_p)


def _gather_point_distances(dist_local: torch.Tensor) -> torch.Tensor:
    """All-gather the flattened point distances of every rank: [G, N_local] -> [G, N_global].

    Ranks may hold different batch sizes, so the sizes are exchanged first and the rows padded with
    -inf (never among the k largest, since k <= N_global).
    """
    world = dist.get_world_size()
    size = torch.tensor([dist_local.shape[1]], device=dist_local.device, dtype=torch.int64)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes_int = [int(s.item()) for s in sizes]
    widest = max(sizes_int)
    padded = F.pad(dist_local, (0, widest - dist_local.shape[1]), value=float("-inf"))
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:, :n] for g, n in zip(gathered, sizes_int)], dim=1)


def _damp_easy_points(grad: torch.Tensor, easy: torch.Tensor, factor: float) -> torch.Tensor:
    # reference `grad[inds] *= factor`: multiplying the other points by 1 is exact, so this is equal
    return torch.where(easy, grad * factor, grad)


def hard_mining_cosine_loss(enc: list[torch.Tensor], dec: list[torch.Tensor], p: float, factor: float = 0.1,
                            global_batch: bool = False) -> torch.Tensor:
    """Mean over groups of the batch-mean global cosine distance, with easy points' gradients damped.

    enc, dec: one [B, C, h, w] tensor per fuse group (enc is detached here). Per group, the point
    distance d = 1 - cos over channels ([B, 1, h, w], no grad) selects the k = int(B*h*w * (1 - p))
    hardest points (float `1 - p`: int(108 * (1 - 0.9)) = 10, int(180 * (1 - 0.9)) = 17); a hook on
    dec multiplies the gradient by `factor` at every point strictly below the k-th largest d. The value
    is 1 - cos of each image's flattened C*h*w vectors, averaged over the batch: p changes only gradients.

    global_batch: with torch.distributed initialised, k and the threshold come from the point distances
    of all ranks (the reference's single-process batch); each rank's loss stays its local batch mean, so
    DDP's gradient averaging gives the global mean when ranks hold equal batches.

    Reference: utils.py global_cosine_hm_percent @c5c76d0.
    """
    if len(enc) != len(dec) or not enc:
        raise ValueError(f"enc and dec must be equally long non-empty lists of groups, got {len(enc)} and {len(dec)}")
    with torch.no_grad():
        point_dists = [1 - F.cosine_similarity(e.detach(), d, dim=1).unsqueeze(1) for e, d in zip(enc, dec)]
        if len({pd.shape for pd in point_dists}) != 1:
            raise ValueError(f"all groups must share one [B, C, h, w] shape, got {[tuple(d.shape) for d in dec]}")
        flat = torch.stack([pd.reshape(-1) for pd in point_dists])  # [G, B*h*w]
        if global_batch and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = _gather_point_distances(flat)
        numel = flat.shape[1]
        k = int(numel * (1 - p))
        if not 1 <= k <= numel:
            raise ValueError(f"hard mining keeps k = int({numel} * (1 - {p})) = {k} points; p must leave at "
                             "least one point per group (lower train.hard_mining_final_p or raise the batch)")
        # the k-th largest = the (numel - k + 1)-th smallest: the value of topk(k)[0][-1], in O(numel)
        thresholds = torch.kthvalue(flat, numel - k + 1, dim=1).values  # [G]

    total = 0
    for i, (e, d) in enumerate(zip(enc, dec)):
        a = e.detach()
        total = total + torch.mean(1 - F.cosine_similarity(a.reshape(a.shape[0], -1), d.reshape(d.shape[0], -1)))
        if d.requires_grad:
            easy = point_dists[i] < thresholds[i]  # [B, 1, h, w], broadcast over channels
            d.register_hook(lambda grad, easy=easy: _damp_easy_points(grad, easy, factor))
    return total / len(enc)
