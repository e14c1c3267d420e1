"""BS-RoFormer (Lu et al., "Music Source Separation with Band-Split RoPE Transformer"):
the spectrum cut into fixed bands of consecutive bins, axial transformers over time and
bands, and a complex mask per stem."""
from __future__ import annotations

import typing as tp

import torch

from demix.separation.roformer.layers import BandSplit, MaskEstimator, RMSNorm
from demix.separation.roformer.network import RoformerNetwork

DEFAULT_FREQS_PER_BANDS = (
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4,
    12, 12, 12, 12, 12, 12, 12, 12,
    24, 24, 24, 24, 24, 24, 24, 24,
    48, 48, 48, 48, 48, 48, 48, 48,
    128, 129,
)
"""Bins per band for a 2048-point STFT (62 bands over 1025 bins), MSST's default."""


class BSRoformer(RoformerNetwork):
    """BS-RoFormer with MSST's constructor keywords and `state_dict` layout."""

    def __init__(self, dim: int, *, depth: int, freqs_per_bands: tp.Sequence[int] = DEFAULT_FREQS_PER_BANDS,
                 mask_estimator_depth: int = 2, mlp_expansion_factor: int = 4, **network: tp.Any):
        """`network`: the keywords both RoFormers take (`RoformerNetwork`)."""
        super().__init__(dim, depth=depth, transformer_norm_output=False, **network)
        bins = self.n_fft // 2 + 1
        freqs_per_bands = tuple(freqs_per_bands)
        if len(freqs_per_bands) < 2 or sum(freqs_per_bands) != bins:
            raise ValueError(f"freqs_per_bands must split the STFT's {bins} bins into at least two "
                             f"bands; they add up to {sum(freqs_per_bands)}")
        band_inputs = tuple(2 * bins_in_band * self.audio_channels for bins_in_band in freqs_per_bands)
        self.final_norm = RMSNorm(dim)
        self.band_split = BandSplit(dim, band_inputs)
        # MSST's BS-RoFormer builds `mask_estimator_depth - 1` hidden layers.
        self.mask_estimators = torch.nn.ModuleList(
            MaskEstimator(dim, band_inputs, mask_estimator_depth - 1, mlp_expansion_factor)
            for _ in range(self.num_stems))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """`[batch, channels, time]` -> `[batch, stems, channels, time]`."""
        self.check_channels(audio)
        spectrum = self.stft(audio)  # b (f s) t c
        x = self.band_split(spectrum.transpose(1, 2).flatten(2))  # b t bands d
        x = self.final_norm(self.axial_transform(x))
        masks = torch.stack([estimate(x) for estimate in self.mask_estimators], dim=1)  # b n t (f c)
        masks = masks.unflatten(-1, (-1, 2)).transpose(2, 3).float()  # b n f t c
        product = torch.view_as_complex(spectrum.contiguous()).unsqueeze(1) * torch.view_as_complex(
            masks.contiguous())
        return self.istft(product, audio.shape[-1])
