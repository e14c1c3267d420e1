"""Audio I/O shared by the API (probing uploads) and the worker (reading, writing stems).

Decoding is libsndfile's (through `soundfile`): it reads every PCM width, float,
μ-law/A-law and ADPCM WAV, WAVE_FORMAT_EXTENSIBLE and RF64. What is not a WAV is
named by its magic bytes, so the user learns what they actually sent.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import typing as tp
from pathlib import Path

import numpy as np
import soundfile as sf


WAV_MAX_BYTES = 0xFFFFFFFF - 1024
"""RIFF sizes are 32-bit; bigger outputs are written as RF64 (header space kept in reserve)."""

PCM_SCALES = {"PCM_16": 2 ** 15, "PCM_24": 2 ** 23}
"""Full-scale integer value of each PCM output format."""


@dataclasses.dataclass(frozen=True)
class AudioInfo:
    """What intake learns of an input: from a WAV's header, or from decoding another format
    whole (then `frames`, `samplerate` and `channels` are what decoded)."""
    samplerate: int
    channels: int
    frames: int
    subtype: str  # the codec: libsndfile's name of a WAV's sample format (PCM_16, FLOAT, ULAW),
    # else MPEG_LAYER_III, VORBIS, OPUS, AAC_LC, HE_AAC, ALAC_24, or PCM_<bits> for FLAC and AIFF
    container: str  # WAV, WAVEX (WAVE_FORMAT_EXTENSIBLE), RF64, MP3, FLAC, OGG, AIFF, AIFF-C, MP4,
    # MATROSKA or WEBM
    lossy: bool = False  # whether the codec is (MP3, AAC, Vorbis, Opus)
    decoded_subtype: str = ""  # sample format of the WAV a non-WAV input was decoded to

    @property
    def duration(self) -> float:
        return self.frames / self.samplerate

    @property
    def input_format(self) -> str:
        """Container and codec, as the job JSON shows them: `WAV/PCM_16`, `MP4/AAC_LC`."""
        return f"{self.container}/{self.subtype}"

    @property
    def is_wav(self) -> bool:
        return not self.decoded_subtype

    @property
    def sample_subtype(self) -> str:
        """The libsndfile sample format the worker reads the input as."""
        return self.decoded_subtype or self.subtype


def describe_non_wav(head: bytes) -> tp.Optional[str]:
    """Say what a file looks like if its first bytes are not a WAV header, else None."""
    if head[:4] in (b"RIFF", b"RIFX", b"RF64", b"BW64") and head[8:12] == b"WAVE":
        return None
    return describe_format(head)


def describe_format(head: bytes) -> str:
    """What a file whose first bytes are `head` looks like, for a refusal's message."""
    if not head:
        return "the file is empty"
    if head[:4] in (b"RIFF", b"RIFX", b"RF64", b"BW64"):
        if len(head) < 12:
            return "it is cut off inside its RIFF header"
        if head[8:12] == b"WAVE":
            return "a WAV file"
        return f"it is a RIFF file of type {head[8:12].decode('latin-1')!r} (AVI, WebP, ...), not WAVE"
    stripped = head.lstrip().lower()
    guesses = [
        (stripped.startswith(b"#extm3u") or b"#ext-x-" in stripped,
         "an M3U/HLS playlist (it only names other files or addresses)"),
        (stripped.startswith(b"ffconcat"), "an FFmpeg concat list (it only names other files)"),
        (stripped.startswith(b"[playlist]"), "a PLS playlist (it only names other files or addresses)"),
        (stripped.startswith(b"v=0"), "an SDP session description (it only names network streams)"),
        (stripped.startswith((b"file:", b"http:", b"https:", b"rtsp:", b"rtmp:")),
         "a URL or file name in text (upload the audio itself)"),
        (head.startswith(b"ID3"), "an MP3 file (it starts with an ID3 tag)"),
        (len(head) > 1 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0, "AAC audio (ADTS frame header)"),
        (is_mpeg_audio_frame(head), "an MP3 file (it starts with an MP3 frame header)"),
        (head.startswith(b"fLaC"), "a FLAC file"),
        (head.startswith(b"OggS"), "an Ogg file (Vorbis/Opus)"),
        (head[4:8] == b"ftyp", "an MP4/M4A file"),
        (head.startswith(b"FORM") and head[8:12] in (b"AIFF", b"AIFC"), "an AIFF file"),
        (head.startswith(b"\x1aE\xdf\xa3"), "a Matroska/WebM file"),
        (head.startswith(b"\x89PNG"), "a PNG image"),
        (head.startswith(b"\xff\xd8\xff"), "a JPEG image"),
        (head.startswith((b"GIF87a", b"GIF89a")), "a GIF image"),
        (head.startswith(b"caff"), "a CAF file"),
        (head.startswith(b".snd"), "a Sun/NeXT AU file"),
        (head.startswith(b"0&\xb2u"), "a Windows Media (ASF/WMA) file"),
        (head.startswith(b"MThd"), "a MIDI file (notes, not audio)"),
        (head.startswith(b"PK\x03\x04"), "a ZIP archive"),
        (head.startswith(b"%PDF"), "a PDF document"),
        (stripped.startswith((b"<!doctype html", b"<html")), "an HTML page"),
        (stripped.startswith(b"<?xml"), "an XML document"),
        (stripped.startswith((b"{", b"[")), "JSON or other text"),
    ]
    for matched, description in guesses:
        if matched:
            return description
    return f"its first bytes ({head[:8].hex(' ')}) match no audio format"


def is_mpeg_audio_frame(head: bytes) -> bool:
    """An MPEG audio frame header: 11 sync bits, then no reserved version, layer,
    bitrate or sample-rate value (which random bytes rarely all avoid)."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    version, layer = (head[1] >> 3) & 0b11, (head[1] >> 1) & 0b11
    bitrate, rate = head[2] >> 4, (head[2] >> 2) & 0b11
    return version != 0b01 and layer != 0b00 and bitrate != 0b1111 and rate != 0b11


def read_info(path: Path) -> AudioInfo:
    """The header facts of a sound file, unchecked (uploads go through `demix.intake.inspection`)."""
    info = sf.info(str(path))
    return AudioInfo(samplerate=info.samplerate, channels=info.channels, frames=info.frames,
                     subtype=info.subtype, container=info.format)


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """The whole file as float32 `[frames, channels]` and its sample rate."""
    data, samplerate = sf.read(str(path), dtype="float32", always_2d=True)
    return data, samplerate


def quantize(samples: np.ndarray, subtype: str) -> np.ndarray:
    """Float samples in [-1, 1) to the integers `write_audio` stores for a PCM subtype.

    Rounds to the nearest step and clamps to the format's range (integers never wrap).
    Float subtypes pass through as float32.
    """
    if subtype not in PCM_SCALES:
        return samples.astype(np.float32, copy=False)
    scale = PCM_SCALES[subtype]
    return np.clip(np.rint(samples.astype(np.float64) * scale), -scale, scale - 1).astype(np.int32)


def dequantize(values: np.ndarray, subtype: str) -> np.ndarray:
    """Inverse of `quantize`: the float samples a reader of the file will see."""
    if subtype not in PCM_SCALES:
        return values.astype(np.float32, copy=False)
    return (values.astype(np.float64) / PCM_SCALES[subtype]).astype(np.float32)


def write_audio(path: Path, samples: np.ndarray, samplerate: int, subtype: str) -> None:
    """Write `[frames, channels]` samples as a WAV (RF64 past 4 GiB).

    Integer input must come from `quantize` for the same subtype (see `AudioWriter`).
    """
    with AudioWriter(path, samplerate, samples.shape[1], subtype, frames=samples.shape[0]) as writer:
        writer.write(samples)


class AudioWriter:
    """A WAV (RF64 when `frames` samples would pass 4 GiB) or, with `flac=True`, a FLAC
    file, written block by block.

    Blocks are `[frames, channels]`; integer blocks must come from `quantize` for the
    same subtype. They are handed to libsndfile as left-aligned int32, which it stores
    bit-exactly; handing it floats would let libsndfile rescale by 0x7FFF and shift
    every sample by up to one step. `frames` only chooses the container: the header
    holds however many frames were written when the writer is closed.
    """

    def __init__(self, path: Path, samplerate: int, channels: int, subtype: str, frames: int,
                 flac: bool = False):
        self.subtype = subtype
        if flac:
            container = "FLAC"
        else:
            container = "WAV" if _wav_bytes(frames, channels, subtype) <= WAV_MAX_BYTES else "RF64"
        self.path, self.flac = Path(path), flac
        self._file = sf.SoundFile(str(path), "w", samplerate=samplerate, channels=channels,
                                  subtype=subtype, format=container)

    def write(self, samples: np.ndarray) -> None:
        if self.subtype in PCM_SCALES:
            shift = 32 - int(np.log2(PCM_SCALES[self.subtype])) - 1
            samples = samples.astype(np.int32) << shift
        with disk_full_as_os_error(self.path):
            self._file.write(samples)

    def close(self) -> None:
        if self._file.closed:
            return
        with disk_full_as_os_error(self.path):
            self._file.close()
        # libsndfile's FLAC encoder drops a failed write without an error: a disk with no
        # room left after the file was written means the file is most likely cut short.
        if self.flac and filesystem_full(self.path):
            raise _disk_full(self.path)

    def __enter__(self) -> "AudioWriter":
        return self

    def __exit__(self, *exc_info: tp.Any) -> None:
        self.close()


def filesystem_full(path: Path) -> bool:
    """Whether the filesystem holding `path` has no block left for unprivileged writers."""
    return os.statvfs(Path(path).parent).f_bavail == 0


@contextlib.contextmanager
def disk_full_as_os_error(path: Path) -> tp.Iterator[None]:
    """Turn libsndfile's failed write into the `OSError(ENOSPC)` behind it.

    libsndfile reports any failed write only as "System error" (its errno is not exposed);
    when the filesystem then has no room left, a full disk is what failed it.
    """
    try:
        yield
    except sf.LibsndfileError as exc:
        if filesystem_full(path):
            raise _disk_full(path) from exc
        raise


def _disk_full(path: Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _wav_bytes(frames: int, channels: int, subtype: str) -> int:
    width = {"PCM_16": 2, "PCM_24": 3}.get(subtype, 4)
    return frames * channels * width


class AudioReader:
    """A sound file read front to back in float32 `[frames, channels]` blocks."""

    def __init__(self, path: Path):
        self._file = sf.SoundFile(str(path))
        self.samplerate: int = self._file.samplerate
        self.channels: int = self._file.channels
        self.frames: int = self._file.frames

    def read(self, frames: int) -> np.ndarray:
        """The next `frames` frames (fewer at the end of the file, none after it)."""
        return self._file.read(frames, dtype="float32", always_2d=True)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "AudioReader":
        return self

    def __exit__(self, *exc_info: tp.Any) -> None:
        self.close()

