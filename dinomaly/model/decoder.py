"""The trainable parts: the noisy MLP bottleneck and the linear-attention decoder blocks.

Parameter names match the reference's (`bottleneck.0.fc1.weight`, `decoder.3.attn.qkv.weight`, ...), so
official checkpoints load one to one. Reference: models/vision_transformer.py bMlp, Block, LinearAttention2
and the init loop of dinomaly_mvtec_uni.py @c5c76d0.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

DECODER_NORM_EPS = 1e-8


class NoisyBottleneck(Mlp):
    """timm's Mlp (fc1 -> GELU -> dropout -> fc2 -> dropout) with the same dropout on its input too.

    The dropout is the "noisy bottleneck": it keeps the decoder from learning the identity. Active in train()
    only. [B, N, D] -> [B, N, D]. Reference: models/vision_transformer.py bMlp (one Dropout used three times).
    """

    def __init__(self, dim: int, dropout: float):
        super().__init__(dim, hidden_features=4 * dim, out_features=dim, act_layer=nn.GELU, drop=dropout)
        self.drop_in = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.drop_in(x))


class LinearAttention(nn.Module):
    """Linear attention with elu+1 feature maps: no softmax, no scale, attends over all tokens.

    out_n = phi(q_n) (sum_m phi(k_m)^T v_m) / (phi(q_n) . sum_m phi(k_m) + eps), per head; eps = 0 in the
    reference (model.attention_eps). Its inability to focus is the point: the decoder cannot copy its input.
    Reference: models/vision_transformer.py LinearAttention2 @c5c76d0.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer: type[nn.Module] | None = None, eps: float = 0.0,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        # timm's Block passes every Attention option; refuse those this attention does not have
        if qk_norm or scale_norm or attn_drop:
            raise ValueError("LinearAttention has no qk_norm, scale_norm or attention dropout")
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.eps = eps
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device, dtype=dtype)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("LinearAttention attends over all tokens; attn_mask / is_causal are unsupported")
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, h, N, d]
        q, k, v = F.elu(qkv[0]) + 1.0, F.elu(qkv[1]) + 1.0, qkv[2]  # [B, h, N, d]
        kv = k.transpose(-2, -1) @ v  # [B, h, d, d]
        normaliser = q @ k.sum(dim=-2).unsqueeze(-1)  # [B, h, N, 1]
        if self.eps:
            normaliser = normaliser + self.eps
        out = (q @ kv) * (1.0 / normaliser)  # [B, h, N, d]; reciprocal first, as the reference
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj_drop(self.proj(out))


class DecoderBlock(Block):
    """timm's pre-norm Block with linear attention: LayerNorm eps 1e-8, no LayerScale, GELU MLP ratio 4.

    [B, N, D] -> [B, N, D]. Reference: models/vision_transformer.py Block(attn=LinearAttention2,
    qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-8)) @c5c76d0.
    """

    def __init__(self, dim: int, num_heads: int, attention_eps: float = 0.0):
        super().__init__(dim, num_heads, mlp_ratio=4.0, qkv_bias=True, act_layer=nn.GELU,
                         norm_layer=partial(nn.LayerNorm, eps=DECODER_NORM_EPS), attn_layer=LinearAttention)
        self.attn.eps = attention_eps  # timm's Block has no way to pass it through


def init_trainable(modules: nn.Module) -> None:
    """Reference init of bottleneck + decoder, in module order.

    Linear weights trunc_normal(std 0.01, truncated to [-0.03, 0.03]), biases 0; LayerNorm weight 1, bias 0.
    Reference: dinomaly_mvtec_uni.py (loop over nn.ModuleList([bottleneck, decoder]).modules()) @c5c76d0.
    """
    for module in modules.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.01, a=-0.03, b=0.03)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
