"""Mel-Band RoFormer (Wang et al., "Mel-RoFormer for Vocal Separation and Vocal Melody
Transcription"): like BS-RoFormer, but its bands are the overlapping supports of a mel
filterbank, and the masks of overlapping bands are averaged per bin."""
from __future__ import annotations

import typing as tp

import numpy as np
import torch

from demix.separation.roformer.layers import BandSplit, MaskEstimator
from demix.separation.roformer.network import RoformerNetwork


class MelBandRoformer(RoformerNetwork):
    """Mel-Band RoFormer with MSST's constructor keywords and `state_dict` layout."""

    def __init__(self, dim: int, *, depth: int, num_bands: int = 60, sample_rate: int = 44100,
                 mask_estimator_depth: int = 1, mlp_expansion_factor: int = 4, **network: tp.Any):
        """`network`: the keywords both RoFormers take (`RoformerNetwork`)."""
        super().__init__(dim, depth=depth, transformer_norm_output=True, **network)
        in_band = torch.from_numpy(band_membership(sample_rate, self.n_fft, num_bands))  # bands × bins
        bins = in_band.shape[1]
        bin_indices = torch.arange(bins).expand(num_bands, bins)[in_band]  # every band's bins, band by band
        channels = self.audio_channels
        # Rows of the `(bin, channel)`-interleaved spectrum that feed the bands, in order.
        self.register_buffer("freq_indices", (bin_indices[:, None] * channels + torch.arange(channels)).flatten(),
                             persistent=False)
        self.register_buffer("num_bands_per_freq", in_band.sum(dim=0), persistent=False)
        band_inputs = tuple(2 * int(count) * channels for count in in_band.sum(dim=1))
        self.band_split = BandSplit(dim, band_inputs)
        # MSST's Mel-Band RoFormer builds `mask_estimator_depth` hidden layers.
        self.mask_estimators = torch.nn.ModuleList(
            MaskEstimator(dim, band_inputs, mask_estimator_depth, mlp_expansion_factor)
            for _ in range(self.num_stems))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """`[batch, channels, time]` -> `[batch, stems, channels, time]`."""
        self.check_channels(audio)
        batch = audio.shape[0]
        spectrum = self.stft(audio)  # b (f s) t c
        x = self.band_split(spectrum[:, self.freq_indices].transpose(1, 2).flatten(2))  # b t bands d
        x = self.axial_transform(x)
        masks = torch.stack([estimate(x) for estimate in self.mask_estimators], dim=1)  # b n t (F c)
        masks = torch.view_as_complex(masks.unflatten(-1, (-1, 2)).transpose(2, 3).float().contiguous())
        complex_spectrum = torch.view_as_complex(spectrum.contiguous())  # b (f s) t
        stems, frames = masks.shape[1], complex_spectrum.shape[-1]
        # A bin in several bands gets the mean of their masks.
        summed = torch.zeros(batch, stems, *complex_spectrum.shape[1:], dtype=complex_spectrum.dtype,
                             device=audio.device)
        summed.scatter_add_(2, self.freq_indices.view(1, 1, -1, 1).expand(batch, stems, -1, frames), masks)
        bands_per_row = self.num_bands_per_freq.repeat_interleave(self.audio_channels).to(torch.float32)
        averaged = summed / bands_per_row.clamp(min=1e-8)[:, None]
        return self.istft(complex_spectrum.unsqueeze(1) * averaged, audio.shape[-1])


def band_membership(samplerate: int, n_fft: int, num_bands: int) -> np.ndarray:
    """`[num_bands, n_fft // 2 + 1]` booleans: which STFT bins each band covers, the
    support of librosa's default (Slaney) mel filterbank, with the first bin in the
    first band and the last bin in the last band (as MSST forces them)."""
    weights = slaney_mel_filterbank(samplerate, n_fft, num_bands)
    weights[0, 0] = 1.0
    weights[-1, -1] = 1.0
    in_band = weights > 0
    if not in_band.any(axis=0).all():
        raise ValueError(f"{num_bands} mel bands leave some of the {n_fft}-point STFT's bins uncovered")
    return in_band


def slaney_mel_filterbank(samplerate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """`[n_mels, n_fft // 2 + 1]` float32 triangular filters on the Slaney mel scale from
    0 Hz to Nyquist, area-normalised: the same numbers as
    `librosa.filters.mel(sr=samplerate, n_fft=n_fft, n_mels=n_mels)`."""
    bin_hz = np.fft.rfftfreq(n=n_fft, d=1.0 / samplerate)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(samplerate / 2.0), n_mels + 2))
    widths = np.diff(edges_hz)
    ramps = np.subtract.outer(edges_hz, bin_hz)
    weights = np.zeros((n_mels, len(bin_hz)), dtype=np.float32)
    for band in range(n_mels):
        rising = -ramps[band] / widths[band]
        falling = ramps[band + 2] / widths[band + 1]
        weights[band] = np.maximum(0, np.minimum(rising, falling))
    weights *= (2.0 / (edges_hz[2:n_mels + 2] - edges_hz[:n_mels]))[:, np.newaxis]
    return weights


_LINEAR_HZ_PER_MEL = 200.0 / 3  # the Slaney scale is linear below 1 kHz...
_LOG_START_HZ = 1000.0
_LOG_START_MEL = _LOG_START_HZ / _LINEAR_HZ_PER_MEL  # 15 mel
_LOG_STEP = np.log(6.4) / 27.0  # ...and logarithmic above


def _hz_to_mel(hz: tp.Union[float, np.ndarray]) -> np.ndarray:
    hz = np.asanyarray(hz, dtype=np.float64)
    mel = hz / _LINEAR_HZ_PER_MEL
    above = hz >= _LOG_START_HZ
    return np.where(above, _LOG_START_MEL + np.log(np.maximum(hz, _LOG_START_HZ) / _LOG_START_HZ) / _LOG_STEP, mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    hz = _LINEAR_HZ_PER_MEL * mel
    above = mel >= _LOG_START_MEL
    return np.where(above, _LOG_START_HZ * np.exp(_LOG_STEP * (mel - _LOG_START_MEL)), hz)
