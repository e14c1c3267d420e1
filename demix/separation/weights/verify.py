"""Step 3: the converted model proven against the ONNX graph on the same input."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from demix.separation.weights.pull_errors import MissingDependencyError, VerificationError


def _test_mix(samples: int, signal: int, channels: int, samplerate: int, seed: int) -> torch.Tensor:
    """A fixed, music-like stereo input: a few tones plus noise, zero after `signal`."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(signal, dtype=torch.float64) / samplerate
    mix = torch.zeros(channels, samples, dtype=torch.float64)
    for freq in (55.0, 220.0, 440.0, 1760.0):
        phase = torch.rand(channels, 1, generator=generator, dtype=torch.float64) * 6.283
        mix[:, :signal] += 0.1 * torch.sin(2 * torch.pi * freq * t + phase)
    mix[:, :signal] += 0.05 * torch.randn(channels, signal, generator=generator, dtype=torch.float64)
    return mix.float()[None]


def verify_conversion(onnx_path: Path, model: nn.Module, tolerance: float = 1e-3,
                      seconds: float | None = None, seed: int = 0) -> float:
    """Run the ONNX graph and `model` on one seeded input; return max |Δ| of the stems.

    The graph is HTDemucs' forward without its first and last steps: it takes the
    waveform and the CaC magnitude spectrogram and returns the frequency branch's
    output (before masking/iSTFT) and the time branch's waveforms. Its spectrogram input
    is therefore computed by `model._spec`/`model._magnitude` from the same waveform,
    and its outputs are finished with `model._mask`/`model._ispec`, so both sides are
    compared as separated stems. `seconds` of signal (default: one full training
    segment, the graph's fixed length) are zero-padded to the segment, as demucs does.
    Raises `VerificationError` if the difference exceeds `tolerance`.
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            "verifying the conversion needs `onnxruntime`: pip install onnxruntime") from exc
    model.eval()
    samplerate = int(model.samplerate)
    length = int(model.segment * samplerate)
    signal = length if seconds is None else int(round(seconds * samplerate))
    if not 0 < signal <= length:
        raise ValueError(f"seconds must be in (0, {length / samplerate}], got {seconds}")

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = {len(arg.shape): arg for arg in session.get_inputs()}
    if sorted(inputs) != [3, 4]:
        raise VerificationError(
            f"unexpected ONNX inputs {[(a.name, a.shape) for a in session.get_inputs()]}: "
            "expected a waveform [B, C, T] and a spectrogram [B, C, F, T']")
    wave_len = inputs[3].shape[-1]
    if isinstance(wave_len, int) and wave_len != length:
        raise VerificationError(f"graph takes {wave_len} samples, the model's segment is {length}")

    mix = _test_mix(length, signal, model.audio_channels, samplerate, seed)
    with torch.no_grad():
        z = model._spec(mix)
        mag = model._magnitude(z)
        freq_out, time_out = session.run(None, {inputs[3].name: mix.numpy(),
                                                inputs[4].name: mag.numpy()})
        # Free the session's weights and arenas before torch's forward pass to keep the
        # peak memory to one model's activations at a time.
        del session
        expected = model(mix)
        freq_out = torch.from_numpy(freq_out)
        time_out = torch.from_numpy(time_out)
        if freq_out.dim() != 5:  # outputs are in export order, but do not rely on it
            freq_out, time_out = time_out, freq_out
        stems = model._ispec(model._mask(z, freq_out), length)
        actual = time_out.reshape(stems.shape) + stems
    delta = float((expected - actual).abs().max())
    if not delta <= tolerance:  # also catches NaN
        raise VerificationError(f"converted model differs from the ONNX graph by {delta:.3g} "
                                f"(max |Δ|), above the tolerance {tolerance:g}")
    return delta
