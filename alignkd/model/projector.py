"""LDPv2, MobileVLM V2's projector: per-token MLP → 2D average pool → depthwise-conv PEG with residual.

The submodule names mirror the original code so that the state dict reads exactly
`mlp.mlp.{0,2}.*` and `peg.peg.0.*` (the pool has no weights).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FeatureIRLayer(nn.Module):
    """Per-token MLP: Linear(in, out) → GELU (exact, not tanh) → Linear(out, out)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def _to_grid(x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape  # (B, N, C), N a square
    side = math.isqrt(n)
    return x.transpose(1, 2).reshape(b, c, side, side)  # (B, C, side, side)


class TokenDownLayer(nn.Module):
    """Adaptive average pooling of the token grid, e.g. 24×24 → 12×12."""

    def __init__(self, grid: int):
        super().__init__()
        self.dwn = nn.Sequential(nn.AdaptiveAvgPool2d((grid, grid)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwn(_to_grid(x)).flatten(2).transpose(1, 2)  # (B, grid², C)


class PosInjectLayer(nn.Module):
    """PEG: depthwise 3×3 conv (with bias) over the token grid, plus the input (residual)."""

    def __init__(self, dim: int):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = _to_grid(x)  # (B, C, g, g)
        return (self.peg(grid) + grid).flatten(2).transpose(1, 2)  # (B, g², C)


class LDPv2Projector(nn.Module):
    """(B, 576, vision_dim) → (B, 144, lm_dim) for the real models. No normalisation layer."""

    def __init__(self, vision_dim: int, lm_dim: int, pooled_grid: int = 12):
        super().__init__()
        self.mlp = FeatureIRLayer(vision_dim, lm_dim)
        self.pool = TokenDownLayer(pooled_grid)
        self.peg = PosInjectLayer(lm_dim)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype, which the CLIP features are cast to."""
        return self.mlp.mlp[0].weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.peg(self.pool(self.mlp(x)))
