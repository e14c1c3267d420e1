"""The separation engine: plain functions over numpy arrays and files, no Celery.

It follows `demucs.separate` exactly where that matters for the output: the mix is
normalised by the mean and standard deviation of its mono reference, run through
`demucs.apply.apply_model` (segments overlapping by `overlap`, triangular
cross-fades), and de-normalised. Around it, the engine converts any input to the
model's 44.1 kHz stereo and converts every stem back to the input's rate and
channel count.
"""
from __future__ import annotations

import dataclasses
import math
import random
import typing as tp
from pathlib import Path

import numpy as np
import soxr
import torch

from shared.audio import dequantize, output_subtype, quantize, read_audio, read_info
from shared.errors import SeparationFailed
from shared.stems import ALL, output_names

ProgressFn = tp.Callable[[float], None]
WriteStemFn = tp.Callable[[str, np.ndarray, int, str], None]
"""write_stem(name, samples [frames, channels], samplerate, subtype)"""

RESAMPLE_QUALITY = "VHQ"
"""soxr's very-high-quality setting: resampling error far below 16-bit quantisation."""

MODEL_SHARE = 0.9
"""Share of a job's progress spent in the model; reading/resampling and writing share the rest."""


@dataclasses.dataclass(frozen=True)
class SeparationOptions:
    """How to run the model."""
    shifts: int = 0  # random-shift passes averaged; 0 = one deterministic pass
    overlap: float = 0.25  # overlap between segments, fraction of a segment
    device: str = "cpu"
    seed: int = 0  # seeds the shifts, so a job's output is reproducible


def separate_waveform(model: torch.nn.Module, wav: np.ndarray, samplerate: int,
                      options: SeparationOptions = SeparationOptions(),
                      progress: tp.Optional[ProgressFn] = None) -> dict[str, np.ndarray]:
    """Separate a `[frames, channels]` float waveform (mono or stereo, any rate).

    Returns every source of the model as float32 `[frames, channels]` at the input's
    rate, length and channel count.
    """
    frames, channels = wav.shape
    stereo = np.repeat(wav, 2, axis=1) if channels == 1 else wav
    if samplerate != model.samplerate:
        stereo = soxr.resample(stereo, samplerate, model.samplerate, quality=RESAMPLE_QUALITY)
    mix = torch.from_numpy(np.ascontiguousarray(stereo.T, dtype=np.float32))
    estimates = apply_normalised(model, mix, options, progress)  # [sources, 2, length]
    sources = {}
    for name, estimate in zip(model.sources, estimates):
        stem = estimate.T.numpy()
        if samplerate != model.samplerate:
            stem = soxr.resample(stem, model.samplerate, samplerate, quality=RESAMPLE_QUALITY)
        stem = _fit_length(stem, frames)
        if channels == 1:
            # The model saw the mono signal on both channels; fold its stereo estimate back.
            stem = stem.mean(axis=1, keepdims=True)
        sources[name] = np.ascontiguousarray(stem, dtype=np.float32)
    return sources


def apply_normalised(model: torch.nn.Module, mix: torch.Tensor, options: SeparationOptions,
                     progress: tp.Optional[ProgressFn] = None) -> torch.Tensor:
    """`demucs.separate`'s core on a `[2, length]` mix at the model's rate: normalise,
    `apply_model`, de-normalise. Returns `[sources, 2, length]`."""
    from demucs.apply import apply_model

    ref = mix.mean(0)
    mean = ref.mean()
    std = ref.std() + 1e-8  # as demucs: digital silence gives silent stems, not NaN
    counter = _ChunkCounter(model, mix.shape[-1], options, progress)
    random.seed(options.seed)  # apply_model draws its shifts from `random`
    with torch.inference_mode():
        out = apply_model(model, ((mix - mean) / std)[None], shifts=options.shifts, split=True,
                          overlap=options.overlap, device=options.device, progress=False,
                          callback=counter)
    return (out[0] * std + mean).cpu()


class _ChunkCounter:
    """apply_model callback turning finished segments into a 0..1 progress value."""

    def __init__(self, model: torch.nn.Module, length: int, options: SeparationOptions,
                 progress: tp.Optional[ProgressFn]):
        self.progress = progress
        self.done = 0
        sub_models = getattr(model, "models", [model])
        passes = max(1, options.shifts)
        max_shift = int(0.5 * model.samplerate) if options.shifts else 0
        self.total = 0
        for sub_model in sub_models:
            segment_length = int(sub_model.samplerate * float(sub_model.segment))
            stride = int((1 - options.overlap) * segment_length)
            self.total += passes * math.ceil((length + max_shift) / stride)

    def __call__(self, info: dict) -> None:
        if info.get("state") != "end" or self.progress is None:
            return
        self.done += 1
        self.progress(min(self.done / self.total, 1.0))


def _fit_length(samples: np.ndarray, frames: int) -> np.ndarray:
    """Trim or zero-pad to exactly `frames` (resampling may be off by a sample)."""
    if samples.shape[0] >= frames:
        return samples[:frames]
    return np.pad(samples, ((0, frames - samples.shape[0]), (0, 0)))


def separate_file(model: torch.nn.Module, input_path: Path, stems: str, write_stem: WriteStemFn,
                  options: SeparationOptions = SeparationOptions(),
                  progress: tp.Optional[ProgressFn] = None) -> list[str]:
    """Separate the WAV at `input_path` and hand each requested stem to `write_stem`.

    For `stems="all"` these are the model's sources. For one source `X` they are `X`
    and `no_X = input - X`, computed on the output format's sample grid so that
    `X + no_X` reproduces the input (exactly, for PCM inputs without clipping).
    Returns the names written, in order.
    """
    report = progress or (lambda _value: None)
    names = output_names(stems)
    wav, samplerate = read_audio(input_path)
    subtype = output_subtype(read_info(input_path).subtype)
    report(0.02)
    sources = separate_waveform(model, wav, samplerate, options,
                                progress=lambda value: report(0.02 + MODEL_SHARE * value))
    missing = [name for name in names if not name.startswith("no_") and name not in sources]
    if missing:
        raise SeparationFailed(f"model has no source {missing[0]!r}; it separates "
                               f"{', '.join(sources)}", code="unknown_source")
    if stems == ALL:
        outputs = {name: quantize(sources[name], subtype) for name in names}
    else:
        stem = quantize(sources[stems], subtype)
        rest = dequantize(quantize(wav, subtype), subtype) - dequantize(stem, subtype)
        outputs = {stems: stem, f"no_{stems}": quantize(rest, subtype)}
    for index, (name, samples) in enumerate(outputs.items()):
        write_stem(name, samples, samplerate, subtype)
        report(0.02 + MODEL_SHARE + (1 - 0.02 - MODEL_SHARE) * (index + 1) / len(outputs))
    return names
