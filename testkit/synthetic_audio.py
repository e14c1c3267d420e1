"""Deterministic music-like audio for tests and benchmarks, written with soundfile."""
from __future__ import annotations

import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf


def music_like(samplerate: int, channels: int, seconds: float, seed: int = 0) -> np.ndarray:
    """A `[frames, channels]` float32 signal with a bass line, a melody, clicks and noise,
    peaking around 0.5: enough structure for a model, no clipping."""
    rng = np.random.default_rng(seed)
    frames = max(1, int(round(samplerate * seconds)))
    t = np.arange(frames) / samplerate
    bass = 0.2 * np.sin(2 * np.pi * 55 * t)
    melody = 0.12 * np.sin(2 * np.pi * 440 * t * (1 + 0.01 * np.sin(2 * np.pi * 0.5 * t)))
    clicks = np.zeros(frames)
    clicks[:: max(1, samplerate // 2)] = 0.3
    columns = []
    for channel in range(channels):
        noise = 0.03 * rng.standard_normal(frames)
        columns.append(bass + melody * (1 + 0.2 * channel) + clicks + noise)
    return np.stack(columns, axis=1).astype(np.float32)


def write_wav(path: Path, samplerate: int, channels: int, seconds: float, subtype: str = "PCM_16",
              seed: int = 0, format: str = "WAV") -> Path:
    sf.write(str(path), music_like(samplerate, channels, seconds, seed), samplerate,
             subtype=subtype, format=format)
    return path


def wav_bytes(tmp_path: Path, name: str = "in.wav", **kwargs: tp.Any) -> bytes:
    kwargs.setdefault("samplerate", 44100)
    kwargs.setdefault("channels", 2)
    kwargs.setdefault("seconds", 1.0)
    return write_wav(tmp_path / name, **kwargs).read_bytes()
