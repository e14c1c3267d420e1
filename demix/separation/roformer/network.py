"""What BS-RoFormer and Mel-Band RoFormer share: the STFT, the axial time/frequency
transformer stack, the complex masking and the iSTFT; and what the engine reads off a
model (`sources`, `samplerate`, the window settings).

Both networks take MSST's constructor keywords (a config's `model:` section) so that
a checkpoint's config builds the module its `state_dict` came from. Keywords that only
matter for training (dropout, the multi-resolution STFT loss, gradient checkpointing,
which attention kernel) are accepted and ignored.
"""
from __future__ import annotations

import typing as tp

import torch
from torch import nn

from demix.separation.roformer.config import RoformerConfig
from demix.separation.roformer.layers import RotaryEmbedding, Transformer

TRAINING_ONLY_KEYWORDS = frozenset({
    "attn_dropout", "ff_dropout", "flash_attn", "dim_freqs_in", "multi_stft_resolution_loss_weight",
    "multi_stft_resolutions_window_sizes", "multi_stft_hop_size", "multi_stft_normalized",
    "multi_stft_window_fn", "use_torch_checkpoint", "match_input_audio_length",
})
"""MSST constructor keywords with no effect on an inference forward of the same length."""


class RoformerNetwork(nn.Module):
    """The shared part of both RoFormers; `forward` maps `[batch, channels, time]` audio
    to `[batch, stems, channels, time]` estimates of the same length."""

    def __init__(self, dim: int, *, depth: int, transformer_norm_output: bool, stereo: bool = False,
                 num_stems: int = 1, time_transformer_depth: int = 2, freq_transformer_depth: int = 2,
                 linear_transformer_depth: int = 0, dim_head: int = 64, heads: int = 8, stft_n_fft: int = 2048,
                 stft_hop_length: int = 512, stft_win_length: int = 2048, stft_normalized: bool = False,
                 zero_dc: bool = True, skip_connection: bool = False, use_pope: bool = False,
                 stft_window_fn: tp.Any = None, **training_only: tp.Any):
        """The keywords both RoFormers take, with MSST's defaults (the same in both); each
        subclass takes its band layout and mask estimator keywords and passes the rest on."""
        super().__init__()
        unknown = set(training_only) - TRAINING_ONLY_KEYWORDS
        if unknown:
            raise TypeError(f"unknown RoFormer keyword(s): {', '.join(sorted(unknown))}")
        if use_pope:
            raise ValueError("use_pope (PoPE positions) is not supported; only rotary positions are")
        if stft_window_fn is not None:
            raise ValueError("stft_window_fn is not supported; the STFT uses a Hann window")
        self.stereo = stereo
        self.audio_channels = 2 if stereo else 1
        self.num_stems = num_stems
        self.n_fft = stft_n_fft
        self.skip_connection = skip_connection
        self.zero_dc = zero_dc
        self.stft_kwargs = dict(n_fft=stft_n_fft, hop_length=stft_hop_length, win_length=stft_win_length,
                                normalized=stft_normalized)
        self.stft_win_length = stft_win_length
        self.config: tp.Optional[RoformerConfig] = None

        shared = dict(dim=dim, heads=heads, dim_head=dim_head, norm_output=transformer_norm_output)
        # One rotary embedding for all time transformers and one for all frequency ones, as
        # MSST shares them: checkpoints carry their `freqs` under every attention layer.
        time_rotary, freq_rotary = RotaryEmbedding(dim_head), RotaryEmbedding(dim_head)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            block = []
            if linear_transformer_depth > 0:
                block.append(Transformer(depth=linear_transformer_depth, linear_attn=True, **shared))
            block.append(Transformer(depth=time_transformer_depth, rotary_embed=time_rotary, **shared))
            block.append(Transformer(depth=freq_transformer_depth, rotary_embed=freq_rotary, **shared))
            self.layers.append(nn.ModuleList(block))

    # What the engine reads off a model built from a config (`loading.build_model`).

    @property
    def sources(self) -> tuple[str, ...]:
        return self._config.sources

    @property
    def samplerate(self) -> int:
        return self._config.samplerate

    @property
    def chunk_size(self) -> int:
        return self._config.chunk_size

    @property
    def num_overlap(self) -> int:
        return self._config.num_overlap

    @property
    def batch_size(self) -> int:
        return self._config.batch_size

    @property
    def segment(self) -> float:
        """Seconds per window (what `demix.separation.forward.warm_model` runs once)."""
        return self.chunk_size / self.samplerate

    @property
    def _config(self) -> RoformerConfig:
        if self.config is None:
            raise AttributeError("this RoFormer was built without a config (use loading.build_model)")
        return self.config

    # The forward's stages.

    def stft(self, audio: torch.Tensor) -> torch.Tensor:
        """`[batch, channels, time]` -> real `[batch, bins × channels, frames, 2]`, the
        channels interleaved inside each bin."""
        batch, channels, length = audio.shape
        spectrum = torch.stft(audio.reshape(batch * channels, length), **self.stft_kwargs,
                              window=self._window(audio.device), return_complex=True)
        spectrum = torch.view_as_real(spectrum).unflatten(0, (batch, channels))  # b s f t c
        return spectrum.transpose(1, 2).flatten(1, 2)  # b (f s) t c

    def axial_transform(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer stack on band features `[batch, time, bands, dim]`: in each
        block, attention along time within each band, then across bands in each frame."""
        batch, frames, bands, dim = x.shape
        outputs: list[torch.Tensor] = []
        for index, block in enumerate(self.layers):
            if len(block) == 3:
                linear, time, freq = block
                x = linear(x.reshape(batch, frames * bands, dim)).view(batch, frames, bands, dim)
            else:
                time, freq = block
            if self.skip_connection:
                for earlier in outputs[:index]:
                    x = x + earlier
            x = x.transpose(1, 2).reshape(batch * bands, frames, dim)
            x = time(x).view(batch, bands, frames, dim).transpose(1, 2).reshape(batch * frames, bands, dim)
            x = freq(x).view(batch, frames, bands, dim)
            if self.skip_connection:
                outputs.append(x)
        return x

    def istft(self, spectrum: torch.Tensor, length: int) -> torch.Tensor:
        """Complex `[batch, stems, bins × channels, frames]` -> `[batch, stems, channels, length]`."""
        batch, stems, _, frames = spectrum.shape
        channels = self.audio_channels
        spectrum = spectrum.unflatten(2, (-1, channels)).transpose(2, 3)  # b n s f t
        spectrum = spectrum.reshape(batch * stems * channels, -1, frames)
        if self.zero_dc:
            spectrum = spectrum.index_fill(1, torch.tensor(0, device=spectrum.device), 0.0)
        audio = torch.istft(spectrum, **self.stft_kwargs, window=self._window(spectrum.device),
                            return_complex=False, length=length)
        return audio.view(batch, stems, channels, length)

    def _window(self, device: torch.device) -> torch.Tensor:
        return torch.hann_window(self.stft_win_length, device=device)

    def check_channels(self, audio: torch.Tensor) -> None:
        if audio.dim() != 3 or audio.shape[1] != self.audio_channels:
            raise ValueError(f"expected audio [batch, {self.audio_channels}, time], got {tuple(audio.shape)}")
