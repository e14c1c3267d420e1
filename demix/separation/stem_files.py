"""Writing a job's stems in the format the job asked for.

The engine hands over blocks on a sample grid (PCM integers from `quantize`, or float);
this module encodes them as WAV (RF64 past 4 GiB), FLAC or MP3, into hidden temporary
files that are flushed and renamed into place only when complete. With `clip=rescale`
stems are first kept as float, then all scaled by one gain that brings the loudest
sample of the job to full scale, so they still sum to the (scaled) mix.
"""
from __future__ import annotations

import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf

from demix.atomic_files import PendingFile
from demix.audio.io import PCM_SCALES, AudioReader, AudioWriter, disk_full_as_os_error, quantize
from demix.audio.output_formats import OutputOptions
from demix.storage.local import Storage

MP3_MAX_BITRATE = 320
MP3_MIN_BITRATE = 32
RESCALE_BLOCK_FRAMES = 1 << 16


def mp3_compression_level(bitrate: int) -> float:
    """libsndfile's compression level for a constant MP3 bitrate: it maps level 0..1
    linearly onto 320..32 kbit/s, so a standard bitrate needs its exact point."""
    return min(0.999, (MP3_MAX_BITRATE - bitrate) / (MP3_MAX_BITRATE - MP3_MIN_BITRATE))


class EncodedWriter:
    """One stem file in the job's format, written block by block."""

    def __init__(self, path: Path, output: OutputOptions, samplerate: int, channels: int, frames: int):
        self.output, self.path = output, path
        if output.format in ("wav", "flac"):
            self._file: tp.Any = AudioWriter(path, samplerate, channels, output.subtype, frames,
                                             flac=output.format == "flac")
        else:
            self._file = sf.SoundFile(str(path), "w", samplerate=samplerate, channels=channels,
                                      format="MP3", subtype="MPEG_LAYER_III", bitrate_mode="CONSTANT",
                                      compression_level=mp3_compression_level(output.bitrate))

    def write(self, samples: np.ndarray) -> None:
        """`samples` on the output's grid (`grid_subtype`)."""
        if self.output.format == "mp3":
            samples = np.clip(samples, -1.0, 1.0)  # the encoder would wrap, not clip
            with disk_full_as_os_error(self.path):
                self._file.write(samples)
        else:
            self._file.write(samples)

    def close(self) -> None:
        with disk_full_as_os_error(self.path):
            self._file.close()


class _PeakTrackingWriter:
    """A float stem kept for rescaling, remembering its largest magnitude."""

    def __init__(self, path: Path, samplerate: int, channels: int, frames: int):
        self._file = AudioWriter(path, samplerate, channels, "FLOAT", frames)
        self.peak = 0.0

    def write(self, samples: np.ndarray) -> None:
        if len(samples):
            self.peak = max(self.peak, float(np.abs(samples).max()))
        self._file.write(samples)

    def close(self) -> None:
        self._file.close()


class JobStemSink:
    """The engine's sink for one attempt of a job: temporary files in that attempt's stem
    folder, published (flushed and renamed, `demix.atomic_files`) only when complete."""

    def __init__(self, storage: Storage, job_id: str, output: OutputOptions, attempt: int = 0):
        self.storage, self.job_id, self.output, self.attempt = storage, job_id, output, attempt
        self.rescaling = output.clip == "rescale" and output.clips
        self._kept: dict[str, tuple[_PeakTrackingWriter, PendingFile, int, int, int]] = {}
        self._pending: dict[str, PendingFile] = {}
        self.gain: tp.Optional[float] = None

    def _pending_stem(self, name: str) -> PendingFile:
        self._pending[name] = self.storage.pending_stem(self.job_id, name, self.output.extension,
                                                        self.attempt)
        return self._pending[name]

    def open_stem(self, name: str, samplerate: int, channels: int, subtype: str, frames: int):
        if self.rescaling:
            # Float samples wait in a scratch file until every stem's peak is known.
            scratch = self.storage.pending_stem(self.job_id, name, "float.wav", self.attempt)
            writer = _PeakTrackingWriter(scratch.temporary, samplerate, channels, frames)
            self._kept[name] = (writer, scratch, samplerate, channels, frames)
            return writer
        return EncodedWriter(self._pending_stem(name).temporary, self.output, samplerate, channels,
                             frames)

    def publish(self, name: str) -> None:
        if self.rescaling:
            self._encode_rescaled(name)
        self._pending.pop(name).commit()

    def _encode_rescaled(self, name: str) -> None:
        if self.gain is None:
            # One gain for the whole job, from the loudest sample of any stem: all writers
            # are closed before the first publish, so every peak is known here.
            peak = max(writer.peak for writer, *_ in self._kept.values())
            full_scale = (PCM_SCALES[self.output.subtype] - 1) / PCM_SCALES[self.output.subtype] \
                if self.output.subtype in PCM_SCALES else 1.0
            self.gain = min(1.0, full_scale / peak) if peak > 0 else 1.0
        _, scratch, samplerate, channels, frames = self._kept[name]
        writer = EncodedWriter(self._pending_stem(name).temporary, self.output, samplerate, channels,
                               frames)
        try:
            with AudioReader(scratch.temporary) as reader:
                while len(block := reader.read(RESCALE_BLOCK_FRAMES)):
                    scaled = block * np.float32(self.gain)
                    if self.output.subtype in PCM_SCALES:
                        scaled = quantize(scaled, self.output.subtype)
                    writer.write(scaled)
        finally:
            writer.close()
        scratch.discard()
