"""Checking an upload before anything is queued: is it audio the worker can separate?

`inspect_upload` is the one call the API makes. An upload in another format than WAV is
named from its magic bytes and decoded whole into the job's WAV (`demix.audio.decoders`), so
the worker only ever reads WAV. For a WAV, intake walks the RIFF chunks itself, because
libsndfile silently reads some impossible headers (a block align that contradicts the
sample width), decodes codecs the service does not take (MPEG-in-WAV), and explains
others poorly ("No 'data' chunk marker" for a missing `fmt `). It then repairs the sizes
streaming writers leave unfinished, lets libsndfile open the file, applies the service's
limits, and scans float data for samples the model cannot compute with.
"""
from __future__ import annotations

import dataclasses
import math
import os
import struct
import typing as tp
import uuid
from pathlib import Path

import numpy as np
import soundfile as sf

from demix.audio.io import AudioInfo
from demix.config import Settings
from demix.audio.decoders import MAX_CHANNELS, decode_to_wav, sniff_container
from demix.errors import InvalidAudio

SCAN_BLOCK_FRAMES = 65536
"""Frames read per step of the sample scan (at most 4 MiB for 8 channels of doubles)."""

RIFF_MAX_SIZE = 0xFFFFFFFF
"""Largest size a 32-bit RIFF field holds; a repaired upload past it becomes RF64."""

FLOAT32_MAX = float(np.finfo(np.float32).max)
"""Largest magnitude the worker's float32 arithmetic holds; doubles beyond it become inf."""

FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")
"""libsndfile subtypes that can hold NaN or infinity (integer and companded ones cannot)."""

WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_MS_ADPCM = 0x0002
WAVE_FORMAT_IEEE_FLOAT = 0x0003
WAVE_FORMAT_ALAW = 0x0006
WAVE_FORMAT_MULAW = 0x0007
WAVE_FORMAT_IMA_ADPCM = 0x0011
WAVE_FORMAT_EXTENSIBLE = 0xFFFE

CODECS = {
    WAVE_FORMAT_PCM: "PCM",
    WAVE_FORMAT_IEEE_FLOAT: "IEEE float",
    WAVE_FORMAT_ALAW: "A-law",
    WAVE_FORMAT_MULAW: "μ-law",
    WAVE_FORMAT_IMA_ADPCM: "IMA ADPCM",
    WAVE_FORMAT_MS_ADPCM: "MS ADPCM",
}
"""The encodings accepted, by WAVE format tag (for WAVE_FORMAT_EXTENSIBLE, its sub-format's)."""

UNSUPPORTED_CODECS = {
    0x0031: "GSM 6.10",
    0x0040: "G.721 ADPCM",
    0x0050: "MPEG audio",
    0x0055: "MP3",
    0x00FF: "AAC",
    0x0161: "WMA",
    0x1610: "AAC",
    0x2000: "AC-3",
    0x2001: "DTS",
}
"""Names of other encodings found in WAV files, so a refusal says what the file holds."""

KSDATAFORMAT_GUID_TAIL = bytes.fromhex("0000 1000 8000 00aa 0038 9b71")
"""The last 12 bytes of every WAVE_FORMAT_EXTENSIBLE sub-format GUID that wraps a
plain format tag ({XXXXXXXX-0000-0010-8000-00AA00389B71})."""

DS64_CHUNK_BYTES = 8 + 28
"""A `ds64` chunk: header, then RIFF size, data size, sample count (64-bit) and an empty table."""


@dataclasses.dataclass(frozen=True)
class WavFormat:
    """What the `fmt ` chunk declares about the samples."""
    format_tag: int  # for WAVE_FORMAT_EXTENSIBLE, the sub-format's tag
    channels: int
    samplerate: int
    block_align: int  # bytes per frame; bytes per block for ADPCM
    bits_per_sample: int

    @property
    def sample_format(self) -> str:
        """E.g. "16-bit PCM", as the header declares it."""
        codec = CODECS.get(self.format_tag, f"format tag 0x{self.format_tag:04X}")
        return f"{self.bits_per_sample}-bit {codec}"

    def describe(self) -> str:
        return (f"{self.sample_format}, {self.channels} channel(s), {self.samplerate} Hz, "
                f"block align {self.block_align}")


@dataclasses.dataclass(frozen=True)
class WavLayout:
    """Where a WAV file keeps its header fields and its samples."""
    magic: bytes  # RIFF, RIFX (big-endian), RF64 or BW64
    fmt: WavFormat
    data_start: int  # offset of the first sample byte; the 32-bit size field is just before
    data_size: int  # as declared (from `ds64` for RF64)
    file_size: int
    ds64_start: tp.Optional[int] = None  # offset of the `ds64` chunk's body (RF64, BW64)
    odd_chunks: tuple[tuple[int, int], ...] = ()  # (offset of the size field, size) before data

    @property
    def endian(self) -> str:
        return ">" if self.magic == b"RIFX" else "<"

    @property
    def is_streamed(self) -> bool:
        """Whether the `data` size is one a writer that could not seek back left: it claims
        nothing, or more than the file holds, while the file does hold samples."""
        available = self.file_size - self.data_start
        return available > 0 and (self.data_size == 0 or self.data_size > available)


def inspect_upload(path: Path, settings: Settings) -> AudioInfo:
    """Check that an uploaded file is audio the service can separate, and describe it.

    The file must be the service's own copy: on return it is a WAV the worker reads. An
    upload in another format (MP3, FLAC, Ogg, AIFF, MP4/M4A, Matroska/WebM) is replaced
    by its whole decode (see `demix.audio.decoders.decode_to_wav`); a WAV header left
    unfinished by a streaming writer is repaired in place (see `repair_header`).

    Raises:
        UnsupportedMediaType: no format the service reads (the message says what it looks
            like); `UnsupportedCodec` for a known container holding another codec.
        InvalidAudio: audio we cannot take; `code` is `undecodable_wav`, `corrupt_audio`,
            `no_audio_stream`, `too_many_channels`, `unsupported_samplerate`,
            `empty_audio`, `too_long` or `non_finite_samples`.
        InsufficientStorage: the disk filled up while a decode was written.
    """
    container = sniff_container(path)
    if container is not None:
        return decode_to_wav(path, container, settings)
    layout = read_layout(path)
    check_format(layout.fmt)
    _check_channels(layout.fmt.channels)
    repair_header(path, layout)
    info = _decoder_info(path, layout.fmt)
    if info.frames <= 0:
        raise InvalidAudio("the WAV holds no audio: it has zero frames", code="empty_audio")
    if info.duration > settings.max_duration_s:
        raise InvalidAudio(f"the WAV lasts {info.duration:.1f} s; at most {settings.max_duration_s} s "
                           "are accepted (DEMIX_MAX_DURATION_S)", code="too_long")
    if info.subtype in FLOAT_SUBTYPES:
        _check_samples(path, info)
    return info


def read_layout(path: Path) -> WavLayout:
    """Walk a WAV's chunks up to its `data` chunk (the file must start with a WAV magic).

    Raises:
        InvalidAudio: `undecodable_wav`, saying which chunk is missing, cut off or malformed.
    """
    with open(path, "rb") as file:
        file_size = os.fstat(file.fileno()).st_size
        magic = file.read(4)
        endian = ">" if magic == b"RIFX" else "<"
        fmt: tp.Optional[WavFormat] = None
        ds64_start: tp.Optional[int] = None
        ds64_data_size = 0
        odd_chunks: list[tuple[int, int]] = []
        position = 12  # after "RIFF", the RIFF size and "WAVE"
        while position + 8 <= file_size:
            file.seek(position)
            tag, size = struct.unpack(endian + "4sI", file.read(8))
            body = position + 8
            if tag == b"ds64" and magic in (b"RF64", b"BW64"):
                if size < 24 or body + 24 > file_size:
                    raise _undecodable("its 'ds64' chunk is cut off")
                ds64_start = body
                ds64_data_size = struct.unpack("<8xQ", file.read(16))[0]
            elif tag == b"fmt ":
                fmt = _parse_fmt(file.read(min(size, 40)), size, endian)
            elif tag == b"data":
                if fmt is None:
                    raise _undecodable("it has no 'fmt ' chunk before its 'data' chunk")
                if magic in (b"RF64", b"BW64"):
                    if ds64_start is None:
                        raise _undecodable(f"it is {magic.decode()} but has no 'ds64' chunk")
                    if size == 0xFFFFFFFF:  # the RF64 way of saying "see ds64"
                        size = ds64_data_size
                return WavLayout(magic=magic, fmt=fmt, data_start=body, data_size=size,
                                 file_size=file_size, ds64_start=ds64_start,
                                 odd_chunks=tuple(odd_chunks))
            if size & 1:
                odd_chunks.append((position + 4, size))
            position = body + size + (size & 1)  # chunks are padded to an even size
    if fmt is None:
        raise _undecodable(f"it has no 'fmt ' chunk (the file ends at byte {file_size})")
    raise _undecodable(f"it has no 'data' chunk (the file ends at byte {file_size})")


def _parse_fmt(body: bytes, size: int, endian: str) -> WavFormat:
    if size < 16:
        raise _undecodable(f"its 'fmt ' chunk is {size} bytes long; it needs at least 16")
    if len(body) < min(size, 40):
        raise _undecodable("its 'fmt ' chunk is cut off")
    tag, channels, samplerate, _byte_rate, block_align, bits = struct.unpack(endian + "HHIIHH", body[:16])
    if tag == WAVE_FORMAT_EXTENSIBLE:
        if len(body) < 40:
            raise _undecodable(f"its WAVE_FORMAT_EXTENSIBLE 'fmt ' chunk is {size} bytes long; "
                               "it needs 40")
        guid = body[24:40]
        if guid[4:] != KSDATAFORMAT_GUID_TAIL:
            raise _undecodable(f"its WAVE_FORMAT_EXTENSIBLE sub-format {uuid.UUID(bytes_le=guid)} "
                               f"is not supported; supported are {', '.join(CODECS.values())}")
        tag = struct.unpack(endian + "I", guid[:4])[0]
    return WavFormat(format_tag=tag, channels=channels, samplerate=samplerate,
                     block_align=block_align, bits_per_sample=bits)


def check_format(fmt: WavFormat) -> None:
    """Refuse encodings the service does not take and headers no reader could make sense of.

    Raises:
        InvalidAudio: `undecodable_wav`.
    """
    if fmt.format_tag not in CODECS:
        name = UNSUPPORTED_CODECS.get(fmt.format_tag, "in an unknown encoding")
        raise _undecodable(f"its audio is {name} (format tag 0x{fmt.format_tag:04X}), which is not "
                           f"supported; supported are {', '.join(CODECS.values())}")
    if fmt.channels == 0:
        raise _undecodable("its 'fmt ' chunk declares zero channels")
    if fmt.samplerate == 0:
        raise _undecodable("its 'fmt ' chunk declares a sample rate of 0 Hz")
    frame_bytes = _frame_bytes(fmt)
    # libsndfile derives the frame size from the sample width and ignores block align, so
    # a contradicting one would be read as some other layout of the same bytes.
    if frame_bytes is not None and fmt.block_align != frame_bytes:
        raise _undecodable(f"its 'fmt ' chunk declares {fmt.block_align}-byte frames (block align), "
                           f"but a frame of {fmt.channels} channel(s) of {fmt.sample_format} "
                           f"takes {frame_bytes} bytes")


def _frame_bytes(fmt: WavFormat) -> tp.Optional[int]:
    """Bytes per frame of a fixed-width encoding; None for ADPCM (coded in blocks)."""
    if fmt.format_tag in (WAVE_FORMAT_ALAW, WAVE_FORMAT_MULAW):
        return fmt.channels
    if fmt.format_tag in (WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT):
        return fmt.channels * math.ceil(fmt.bits_per_sample / 8)
    return None


def _check_channels(channels: int) -> None:
    if channels > MAX_CHANNELS:
        raise InvalidAudio(f"the WAV has {channels} channels; at most {MAX_CHANNELS} (7.1) are supported",
                           code="too_many_channels")


def repair_header(path: Path, layout: WavLayout) -> None:
    """Make the header of an upload say what the file holds, in place, where libsndfile
    would otherwise misread it.

    Writers that cannot seek back (`ffmpeg -f wav pipe:`) leave the `data` size at 0 or
    0xFFFFFFFF (RF64: the `ds64` sizes at 0). libsndfile reads a size of 0 as no audio and
    never reads past 4 GiB of a RIFF file, so such a `data` chunk is sized to the rest
    of the file, which becomes RF64 when it is too big for RIFF. BW64 is RF64 under the
    ITU's name, which libsndfile does not know: it gets the RF64 magic. libsndfile's RF64
    reader also skips no pad bytes, so odd-sized chunks there take their pad byte in.
    """
    rf64 = layout.ds64_start is not None
    if not (layout.is_streamed or layout.magic == b"BW64" or (rf64 and layout.odd_chunks)):
        return
    with open(path, "r+b") as file:
        if not rf64 and layout.is_streamed and layout.file_size - 8 > RIFF_MAX_SIZE:
            layout = _make_room_for_ds64(file, layout)
        if layout.ds64_start is None:
            _write_riff_sizes(file, layout)
            return
        file.seek(0)
        file.write(b"RF64")
        for size_offset, size in layout.odd_chunks:
            file.seek(size_offset)
            file.write(struct.pack("<I", size + 1))
        if layout.is_streamed:
            _write_ds64_sizes(file, layout, layout.ds64_start)


def _write_riff_sizes(file: tp.BinaryIO, layout: WavLayout) -> None:
    file.seek(4)
    file.write(struct.pack(layout.endian + "I", layout.file_size - 8))
    file.seek(layout.data_start - 4)
    file.write(struct.pack(layout.endian + "I", layout.file_size - layout.data_start))


def _write_ds64_sizes(file: tp.BinaryIO, layout: WavLayout, ds64_start: int) -> None:
    data_size = layout.file_size - layout.data_start
    # The sample count is only meaningful for fixed-width encodings; libsndfile does not read it.
    frames = data_size // layout.fmt.block_align if layout.fmt.block_align else 0
    file.seek(4)
    file.write(struct.pack("<I", 0xFFFFFFFF))  # the 32-bit sizes say "see ds64"
    file.seek(ds64_start)
    file.write(struct.pack("<QQQ", layout.file_size - 8, data_size, frames))
    file.seek(layout.data_start - 4)
    file.write(struct.pack("<I", 0xFFFFFFFF))


def _make_room_for_ds64(file: tp.BinaryIO, layout: WavLayout) -> WavLayout:
    """Insert an empty `ds64` chunk after the RIFF header (RF64 needs it first); returns the
    layout of the file as it is now. Everything after the header moves up to make room."""
    if layout.endian != "<":
        raise _undecodable("a big-endian (RIFX) WAV cannot hold more than 4 GiB")
    _shift_tail(file, start=12, end=layout.file_size, by=DS64_CHUNK_BYTES)
    file.seek(12)
    file.write(b"ds64" + struct.pack("<I", DS64_CHUNK_BYTES - 8) + bytes(DS64_CHUNK_BYTES - 8))
    return dataclasses.replace(
        layout, magic=b"RF64", ds64_start=20, data_start=layout.data_start + DS64_CHUNK_BYTES,
        file_size=layout.file_size + DS64_CHUNK_BYTES,
        odd_chunks=tuple((offset + DS64_CHUNK_BYTES, size) for offset, size in layout.odd_chunks))


def _shift_tail(file: tp.BinaryIO, start: int, end: int, by: int, block: int = 1 << 20) -> None:
    """Move bytes [start, end) of a file `by` bytes later, in place: copied back to front in
    blocks, so no block is overwritten before it is moved and no second copy is needed."""
    while end > start:
        begin = max(start, end - block)
        file.seek(begin)
        piece = file.read(end - begin)
        file.seek(begin + by)
        file.write(piece)
        end = begin


def _decoder_info(path: Path, fmt: WavFormat) -> AudioInfo:
    """What libsndfile makes of the file; its refusal becomes `undecodable_wav`."""
    try:
        info = sf.info(str(path))
    except sf.LibsndfileError as exc:
        # `error_string` is libsndfile's reason alone, without the server path soundfile adds.
        reason = exc.error_string.strip().rstrip(".") or "unknown decoder error"
        raise _undecodable(f"{reason} (its 'fmt ' chunk declares {fmt.describe()})") from None
    return AudioInfo(samplerate=info.samplerate, channels=info.channels, frames=info.frames,
                     subtype=info.subtype, container=info.format)


def _check_samples(path: Path, info: AudioInfo) -> None:
    unusable = find_unusable_sample(path, info.subtype)
    if unusable is None:
        return
    frame, channel, value = unusable
    if math.isnan(value):
        what = "a NaN sample"
    elif math.isinf(value):
        what = "an infinite sample"
    else:
        what = f"a sample of {value:.3g}, beyond the 32-bit float range"
    raise InvalidAudio(f"the WAV has {what} at frame {frame} (channel {channel + 1}, "
                       f"{frame / info.samplerate:.3f} s in); every sample must be a finite number",
                       code="non_finite_samples")


def find_unusable_sample(path: Path, subtype: str) -> tp.Optional[tuple[int, int, float]]:
    """The first sample of a float WAV the worker cannot compute with — NaN, infinite, or
    a double beyond the float32 range — as (frame, channel, value); None if there is none.

    Reads the file in blocks of `SCAN_BLOCK_FRAMES`, never whole.
    """
    dtype = "float64" if subtype == "DOUBLE" else "float32"
    start = 0
    with sf.SoundFile(str(path)) as file:
        for block in file.blocks(SCAN_BLOCK_FRAMES, dtype=dtype, always_2d=True):
            # NaN compares false, so `not <=` catches NaN, infinity and overflow at once.
            unusable = ~(np.abs(block) <= FLOAT32_MAX)
            if unusable.any():
                frame, channel = np.argwhere(unusable)[0]
                return start + int(frame), int(channel), float(block[frame, channel])
            start += len(block)
    return None


def _undecodable(reason: str) -> InvalidAudio:
    return InvalidAudio(f"the WAV could not be decoded: {reason}", code="undecodable_wav")
