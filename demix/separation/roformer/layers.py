"""The building blocks both RoFormers share: norms, rotary attention, transformers, the
band split and the mask estimators.

Module attribute names and `nn.Sequential` indices are those of MSST's
`models/bs_roformer/` (itself from lucidrains' BS-RoFormer), because they are the
checkpoints' `state_dict` keys: `layers.0.1.layers.0.0.to_qkv.weight` must mean the
same tensor here. Dropout slots are kept as `nn.Identity` so later indices stay put
(this package only runs inference).
"""
from __future__ import annotations

import typing as tp

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / ‖x‖ · √dim · γ."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.gamma


class FeedForward(nn.Module):
    """Pre-norm GELU MLP (`net.0` norm, `net.1` and `net.4` linear layers)."""

    def __init__(self, dim: int, mult: float = 4):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(RMSNorm(dim), nn.Linear(dim, inner), nn.GELU(), nn.Identity(),
                                 nn.Linear(inner, dim), nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over a sequence axis, with adjacent feature pairs
    rotated together (the layout of `rotary_embedding_torch`, whose `freqs` parameter
    checkpoints carry: it is kept as a frozen parameter of the same name)."""

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        exponents = torch.arange(0, dim, 2)[: dim // 2].float() / dim
        self.freqs = nn.Parameter(1.0 / (theta ** exponents), requires_grad=False)

    def rotate(self, t: torch.Tensor) -> torch.Tensor:
        """`t` `[..., positions, features]` rotated by position; same dtype out."""
        positions = torch.arange(t.shape[-2], device=t.device, dtype=self.freqs.dtype)
        angles = (positions[:, None] * self.freqs).repeat_interleave(2, dim=-1)
        width = angles.shape[-1]
        rotated, rest = t[..., :width], t[..., width:]
        pairs = rotated.unflatten(-1, (-1, 2))
        half_turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        rotated = rotated * angles.cos() + half_turned * angles.sin()
        return torch.cat((rotated, rest), dim=-1).to(t.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with rotary positions and a sigmoid gate per head."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64,
                 rotary_embed: tp.Optional[RotaryEmbedding] = None):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.rotary_embed = rotary_embed
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_gates = nn.Linear(dim, heads)
        self.to_out = nn.Sequential(nn.Linear(inner, dim, bias=False), nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        batch, length, _ = x.shape
        q, k, v = self.to_qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.rotary_embed is not None:
            q, k = self.rotary_embed.rotate(q), self.rotary_embed.rotate(k)
        out = F.scaled_dot_product_attention(q, k, v)  # [batch, heads, length, dim_head]
        out = out * self.to_gates(x).transpose(1, 2).unsqueeze(-1).sigmoid()
        return self.to_out(out.transpose(1, 2).reshape(batch, length, -1))


class LinearAttention(nn.Module):
    """Cross-covariance attention (El-Nouby et al., arXiv:2106.09681): features attend
    over features, with ℓ2-normalised queries and keys and a learned temperature."""

    SCALE = 8.0

    def __init__(self, dim: int, dim_head: int = 32, heads: int = 8):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Sequential(nn.Linear(dim, inner * 3, bias=False))
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.to_out = nn.Sequential(nn.Identity(), nn.Linear(inner, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        batch, length, _ = x.shape
        # [3, batch, heads, dim_head, length]: the sequence axis is the features.
        q, k, v = self.to_qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 4, 1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        q = q * self.temperature.exp().to(q.dtype)  # a bf16 copy keeps this parameter fp32
        out = F.scaled_dot_product_attention(q, k, v, scale=self.SCALE)
        return self.to_out(out.permute(0, 3, 1, 2).reshape(batch, length, -1))


class Transformer(nn.Module):
    """`depth` pre-norm residual blocks of attention and feed-forward (`layers.i.0`,
    `layers.i.1`), then an optional output norm."""

    def __init__(self, *, dim: int, depth: int, dim_head: int = 64, heads: int = 8, ff_mult: float = 4,
                 norm_output: bool = True, rotary_embed: tp.Optional[RotaryEmbedding] = None,
                 linear_attn: bool = False):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            if linear_attn:
                attention: nn.Module = LinearAttention(dim=dim, dim_head=dim_head, heads=heads)
            else:
                attention = Attention(dim=dim, heads=heads, dim_head=dim_head, rotary_embed=rotary_embed)
            self.layers.append(nn.ModuleList([attention, FeedForward(dim, mult=ff_mult)]))
        self.norm = RMSNorm(dim) if norm_output else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attention, feed_forward in self.layers:
            x = attention(x) + x
            x = feed_forward(x) + x
        return self.norm(x)


class BandSplit(nn.Module):
    """Each band's features (its bins × channels × re/im) normed and projected to
    `dim`: `[..., sum(dim_inputs)]` -> `[..., bands, dim]`."""

    def __init__(self, dim: int, dim_inputs: tuple[int, ...]):
        super().__init__()
        self.dim_inputs = dim_inputs
        self.to_features = nn.ModuleList(
            nn.Sequential(RMSNorm(dim_in), nn.Linear(dim_in, dim)) for dim_in in dim_inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bands = x.split(self.dim_inputs, dim=-1)
        return torch.stack([project(band) for band, project in zip(bands, self.to_features)], dim=-2)


def mlp(dim_in: int, dim_out: int, dim_hidden: int, hidden_layers: int) -> nn.Sequential:
    """Linear layers with tanh between them, `hidden_layers` hidden widths deep."""
    widths = (dim_in, *(dim_hidden,) * hidden_layers, dim_out)
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if index < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class MaskEstimator(nn.Module):
    """Per band, an MLP with a GLU from `dim` back to the band's features:
    `[..., bands, dim]` -> `[..., sum(dim_inputs)]`."""

    def __init__(self, dim: int, dim_inputs: tuple[int, ...], hidden_layers: int,
                 mlp_expansion_factor: int = 4):
        super().__init__()
        self.dim_inputs = dim_inputs
        hidden = dim * mlp_expansion_factor
        self.to_freqs = nn.ModuleList(
            nn.Sequential(mlp(dim, dim_in * 2, hidden, hidden_layers), nn.GLU(dim=-1))
            for dim_in in dim_inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([estimate(band) for band, estimate in zip(x.unbind(dim=-2), self.to_freqs)],
                         dim=-1)
