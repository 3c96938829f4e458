"""Rotary frequency tables (spec 1.3 and 2.2): theta 1e4 without YaRN on window-only layers, theta 1.6e5 with YaRN
on compressed layers. No YaRN mscale is applied anywhere (unlike V3)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rope_frequencies(rope_dim: int, base: float, original_seq_len: int, factor: float, beta_fast: int,
                     beta_slow: int) -> Tensor:
    """Per-pair angular frequencies f_i [rope_dim/2] fp32, YaRN-corrected when original_seq_len > 0.
    The official code applies YaRN whenever original_seq_len > 0, whatever the runtime max_seq_len."""
    freqs = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if original_seq_len > 0:
        # dimension index whose wavelength makes `n` full turns over the original training context
        def corr(n: float) -> float:
            return rope_dim * math.log(original_seq_len / (n * 2 * math.pi)) / (2 * math.log(base))

        lo = max(math.floor(corr(beta_fast)), 0)
        hi = min(math.ceil(corr(beta_slow)), rope_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    return freqs


class RopeTable:
    """cos/sin lookup by absolute position for one layer kind."""

    def __init__(self, freqs: Tensor) -> None:
        self.freqs = freqs

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [...] int -> cos, sin [..., rope_dim/2] fp32 (angle = p * f_i, computed in fp32 as the
        official outer product)."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self.freqs.to(positions.device)
        return torch.cos(angles), torch.sin(angles)
