"""Uploads that are not WAV: which container they are, and decoding them to the job's WAV.

The container is named from the file's magic bytes alone (`sniff_container`); nothing
else decides which decoder runs. Anything not in `CONTAINERS`, playlists included, is
refused before a decoder sees it.

`decode_to_wav` then decodes the whole stream in bounded blocks into a WAV next to the
upload and replaces the upload with it, so the worker reads WAV as always. Decoding
everything is how the true length is learnt: headers are never believed, the frames
are counted as they come, and decoding stops as soon as the count passes
`DEMIX_MAX_DURATION_S`.

Decoders: libsndfile (`soundfile`) for AIFF, where its decode matches FFmpeg's frame for
frame, whatever the header claims; PyAV (FFmpeg) for MP4/M4A and Matroska/WebM, which
libsndfile cannot read, and for MP3, FLAC and Ogg, where libsndfile believes headers that
FFmpeg (the reference) does not: it pads a cut MP3 out to the length its Xing header
claims, fails on a FLAC whose STREAMINFO holds no or a wrong total length (as
`ffmpeg -f flac pipe:` writes), and cuts an Ogg Vorbis/Opus stream at the length its last
page's granule position claims. FFmpeg is only ever handed the upload as an open Python file (no protocol, no
URL) with the one demuxer the magic bytes named, so playlists, `concat` and URLs inside
a file cannot make it read anything else.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import struct
import typing as tp
from pathlib import Path

import av
import av.logging
import numpy as np
import soundfile as sf

from demix.audio.io import WAV_MAX_BYTES, AudioInfo, describe_format, disk_full_as_os_error, is_mpeg_audio_frame
from demix.config import Settings
from demix.errors import (CorruptAudio, InsufficientStorage, InvalidAudio, NoAudioStream, UnsupportedCodec,
                          UnsupportedMediaType)

MAX_CHANNELS = 8
"""Most channels accepted (7.1); the worker separates them by channel pair."""

MIN_SAMPLERATE, MAX_SAMPLERATE = 8000, 192000
"""Sample rates a decoded input may have (the same range the outputs may be written at)."""

DECODE_BLOCK_FRAMES = 65536
"""Frames read per step from libsndfile (at most 2 MiB for 8 channels of float32)."""

SNIFF_BYTES = 64
"""Bytes read after any ID3v2 tag to name the container."""


@dataclasses.dataclass(frozen=True)
class Container:
    """A container the service decodes, as named from the file's first bytes."""
    name: str  # as `input_format` shows it: MP3, FLAC, OGG, AIFF, MP4, MATROSKA, WEBM
    demuxer: tp.Optional[str]  # FFmpeg's demuxer for PyAV; None: libsndfile decodes it
    codecs: tp.Mapping[str, str]  # codec (FFmpeg's name, or libsndfile's subtype) -> its name
    # in `input_format`; empty: whatever libsndfile reads in the container


CONTAINERS = {
    "MP3": Container("MP3", "mp3", {"mp3float": "MPEG_LAYER_III", "mp3": "MPEG_LAYER_III"}),
    "FLAC": Container("FLAC", "flac", {"flac": "FLAC"}),
    "OGG": Container("OGG", "ogg", {"vorbis": "VORBIS", "opus": "OPUS"}),
    "AIFF": Container("AIFF", None, {}),
    "AIFF-C": Container("AIFF-C", None, {}),
    "MP4": Container("MP4", "mov", {"aac": "AAC", "alac": "ALAC"}),
    "MATROSKA": Container("MATROSKA", "matroska", {"opus": "OPUS", "vorbis": "VORBIS"}),
    "WEBM": Container("WEBM", "matroska", {"opus": "OPUS", "vorbis": "VORBIS"}),
}
"""Every non-WAV container accepted, with the codecs accepted in it."""

LOSSLESS_CODECS = ("flac", "alac")

AAC_PROFILES = {"LC": "AAC_LC", "HE-AAC": "HE_AAC", "HE-AACv2": "HE_AAC_V2"}
"""FFmpeg's AAC profile names -> `input_format`'s (other AAC profiles are refused)."""

MP4_ATOMS = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
"""Top-level atoms an MP4/QuickTime file starts with (most start with `ftyp`)."""

DECODER_ERRORS = (av.FFmpegError, ValueError, UnicodeDecodeError)
"""What PyAV raises on a damaged file: FFmpeg's errors, and its own on values it cannot
convert (a mangled sample format, tag bytes that are no text)."""

FFMPEG_OPTIONS = {"enable_drefs": "0", "use_absolute_path": "0", "protocol_whitelist": "none"}
"""Demuxer options: MP4 data references to other files stay unread, and any file or URL a
demuxer would open besides the upload is refused (no protocol is called `none`)."""


def sniff_container(path: Path) -> tp.Optional[Container]:
    """The container an upload is, from its first bytes; None for a WAV (RIFF/RF64/BW64).

    Raises:
        UnsupportedMediaType: not a container the service decodes; the message says what
            the file looks like (a playlist, an image, a MIDI file, ...).
        UnsupportedCodec: a known container holding a codec the service does not take
            (Ogg FLAC/Speex, raw ADTS AAC, MPEG layer I/II).
    """
    with open(path, "rb") as file:
        head = file.read(SNIFF_BYTES)
        tagged = head[:3] == b"ID3" and len(head) >= 10
        if tagged:  # ID3v2 tag: a 10-byte header and a "synchsafe" size (7 bits a byte)
            size = sum((byte & 0x7F) << (7 * (3 - i)) for i, byte in enumerate(head[6:10]))
            size += 10 + (10 if head[5] & 0x10 else 0)  # the footer, when the flags say so
            file.seek(size)
            head = file.read(SNIFF_BYTES)
            # A tag alone, or a tag before padding: find the first frame in what follows.
            if head and not is_mpeg_audio_frame(head) and not head.startswith(b"fLaC"):
                head = _first_frame_after_tag(file, size)
    if head[:4] in (b"RIFF", b"RIFX", b"RF64", b"BW64") and head[8:12] == b"WAVE" and not tagged:
        return None
    if head.startswith(b"fLaC"):
        return CONTAINERS["FLAC"]
    if is_mpeg_audio_frame(head):
        layer = 4 - ((head[1] >> 1) & 0b11)
        if layer != 3:
            raise UnsupportedCodec(f"the file is MPEG-1/2 audio layer {'I' * layer} (MP{layer}); of MPEG "
                                   "audio only layer III (MP3) is supported")
        return CONTAINERS["MP3"]
    if tagged:
        raise UnsupportedMediaType("the file is not an audio format the service reads: it starts with "
                                   f"an ID3 tag, but no MP3 frame follows it ({describe_format(head)})")
    if head.startswith(b"OggS"):
        return _ogg_container(head)
    if head.startswith(b"FORM") and head[8:12] in (b"AIFF", b"AIFC"):
        return CONTAINERS["AIFF" if head[8:12] == b"AIFF" else "AIFF-C"]
    if head[4:8] in MP4_ATOMS:
        return CONTAINERS["MP4"]
    if head.startswith(b"\x1aE\xdf\xa3"):
        return CONTAINERS["WEBM" if b"webm" in head[:48] else "MATROSKA"]
    if len(head) > 1 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        raise UnsupportedCodec("the file is raw AAC (ADTS frames) without a container; "
                               "upload it as M4A (e.g. `ffmpeg -i in.aac -c copy out.m4a`)")
    raise UnsupportedMediaType(f"the file is not an audio format the service reads: {describe_format(head)}")


def _first_frame_after_tag(file: tp.BinaryIO, start: int, limit: int = 1 << 16) -> bytes:
    """The bytes from the first MP3 frame header within `limit` bytes after an ID3 tag
    (taggers leave padding, and some a few stray bytes, before the first frame); the
    bytes right after the tag when there is none."""
    file.seek(start)
    window = file.read(limit + SNIFF_BYTES)
    for offset in range(min(limit, len(window))):
        if window[offset] == 0xFF and is_mpeg_audio_frame(window[offset:offset + 4]):
            return window[offset:offset + SNIFF_BYTES]
    return window[:SNIFF_BYTES]


def _ogg_container(head: bytes) -> Container:
    """Ogg holds many codecs: its first packet (after the page's segment table) names it."""
    segments = head[26] if len(head) > 26 else 0
    packet = head[27 + segments:27 + segments + 8]
    if packet.startswith(b"OpusHead") or packet.startswith(b"\x01vorbis"):
        return CONTAINERS["OGG"]
    for magic, name in ((b"\x7fFLAC", "FLAC"), (b"Speex", "Speex"), (b"\x80theora", "Theora video")):
        if packet.startswith(magic):
            raise UnsupportedCodec(f"the Ogg file holds {name}; in Ogg only Vorbis and Opus are supported"
                                   + (" (upload a plain .flac file)" if name == "FLAC" else ""))
    raise UnsupportedCodec("the Ogg file's first stream is neither Vorbis nor Opus")


# ---- decoding -----------------------------------------------------------------------

@dataclasses.dataclass
class StreamFacts:
    """What a decoder says about the stream before its first block."""
    codec: str  # as `input_format` names it, e.g. AAC_LC, OPUS, PCM_24
    samplerate: int
    channels: int
    decoded_subtype: str  # the canonical WAV's sample format: FLOAT, PCM_16, PCM_24, PCM_32
    lossy: bool


class DecodedStream(tp.Protocol):
    facts: StreamFacts

    def blocks(self) -> tp.Iterator[np.ndarray]:
        """`[frames, channels]` blocks: float32 for FLOAT, else int16/int32 left-aligned."""


def decode_to_wav(path: Path, container: Container, settings: Settings) -> AudioInfo:
    """Decode the upload at `path` whole into a WAV that replaces it, and describe it.

    The WAV holds every decoded sample unchanged: float32 for lossy codecs, the source's
    integer width for lossless ones. Nothing is kept on a refusal (the upload stays).

    Raises:
        InvalidAudio: `too_long` (decoding stopped at DEMIX_MAX_DURATION_S),
            `too_many_channels`, `unsupported_samplerate`, `empty_audio`,
            `non_finite_samples`, `no_audio_stream`, `corrupt_audio` (the decoder's reason).
        UnsupportedCodec: the container holds a codec the service does not take.
        InsufficientStorage: the disk filled up while the WAV was written.
    """
    decoded = path.with_name(path.name + ".decoded.wav")
    try:
        with _open_stream(path, container) as stream:
            facts = stream.facts
            _check_stream(container, facts)
            frames = _write_wav(stream, decoded, container, settings)
        if frames == 0:
            raise InvalidAudio(f"the {container.name} file holds no audio: it decodes to zero frames",
                               code="empty_audio")
        os.replace(decoded, path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage("the server's disk filled up while decoding the upload; it was "
                                      "not kept, try again later") from exc
        raise
    finally:
        decoded.unlink(missing_ok=True)
    return AudioInfo(samplerate=facts.samplerate, channels=facts.channels, frames=frames,
                     subtype=facts.codec, container=container.name, lossy=facts.lossy,
                     decoded_subtype=facts.decoded_subtype)


def _check_stream(container: Container, facts: StreamFacts) -> None:
    if facts.channels > MAX_CHANNELS:
        raise InvalidAudio(f"the {container.name} file has {facts.channels} channels; at most "
                           f"{MAX_CHANNELS} (7.1) are supported", code="too_many_channels")
    if facts.channels < 1:
        raise CorruptAudio(f"the {container.name} file's audio stream declares no channels")
    if not MIN_SAMPLERATE <= facts.samplerate <= MAX_SAMPLERATE:
        raise InvalidAudio(f"the {container.name} file's audio is at {facts.samplerate} Hz; "
                           f"{MIN_SAMPLERATE}–{MAX_SAMPLERATE} Hz are supported",
                           code="unsupported_samplerate")


def _write_wav(stream: "DecodedStream", target: Path, container: Container, settings: Settings) -> int:
    """Write every block of `stream` to a WAV at `target`; returns the frame count."""
    facts = stream.facts
    limit = settings.max_duration_s * facts.samplerate
    width = {"PCM_16": 2, "PCM_24": 3}.get(facts.decoded_subtype, 4)
    # The longest accepted input decides WAV or RF64 up front (the length is not known yet).
    fmt = "WAV" if limit * facts.channels * width <= WAV_MAX_BYTES else "RF64"
    frames = 0
    # libsndfile reports a failed write as "System error": a full disk becomes ENOSPC again.
    with disk_full_as_os_error(target), \
            sf.SoundFile(str(target), "w", samplerate=facts.samplerate, channels=facts.channels,
                         subtype=facts.decoded_subtype, format=fmt) as wav:
        for block in stream.blocks():
            if block.shape[1] != facts.channels:
                raise CorruptAudio(f"the {container.name} stream changes from {facts.channels} to "
                                   f"{block.shape[1]} channels at {frames / facts.samplerate:.3f} s")
            if frames + len(block) > limit:
                raise InvalidAudio(
                    f"the {container.name} file decodes to more than {settings.max_duration_s} s of audio "
                    f"(decoding stopped there); at most {settings.max_duration_s} s are accepted "
                    "(DEMIX_MAX_DURATION_S)", code="too_long")
            if block.dtype.kind == "f":
                _check_finite(block, frames, facts)
            wav.write(block)
            frames += len(block)
    return frames


def _check_finite(block: np.ndarray, start: int, facts: StreamFacts) -> None:
    unusable = ~np.isfinite(block)
    if unusable.any():
        frame, channel = np.argwhere(unusable)[0]
        raise InvalidAudio(f"the input has a non-finite sample at frame {start + frame} (channel "
                           f"{channel + 1}, {(start + frame) / facts.samplerate:.3f} s in); every "
                           "sample must be a finite number", code="non_finite_samples")


def _open_stream(path: Path, container: Container) -> tp.ContextManager["DecodedStream"]:
    if container.demuxer is None:
        return _SndfileStream(path, container)
    return _FFmpegStream(path, container)


class _SndfileStream:
    """libsndfile's decode of AIFF and AIFF-C."""

    LOSSLESS_SUBTYPES = {"PCM_S8": "PCM_16", "PCM_U8": "PCM_16", "PCM_16": "PCM_16", "PCM_24": "PCM_24",
                         "PCM_32": "PCM_32", "ULAW": "PCM_16", "ALAW": "PCM_16", "IMA_ADPCM": "PCM_16",
                         "DWVW_12": "PCM_16", "DWVW_16": "PCM_16", "DWVW_24": "PCM_24", "GSM610": "PCM_16"}

    def __init__(self, path: Path, container: Container):
        self._container = container
        try:
            self._file = sf.SoundFile(str(path))
        except sf.LibsndfileError as exc:
            raise _corrupt(container, exc.error_string) from None
        subtype = self._file.subtype
        # Integers stay integers of the same width (narrower and companded ones become 16-bit);
        # float stays float.
        self.facts = StreamFacts(codec=subtype, samplerate=self._file.samplerate, channels=self._file.channels,
                                 decoded_subtype=self.LOSSLESS_SUBTYPES.get(subtype, "FLOAT"), lossy=False)

    def blocks(self) -> tp.Iterator[np.ndarray]:
        dtype = "float32" if self.facts.decoded_subtype == "FLOAT" else "int32"
        while True:
            try:
                # Not `SoundFile.read(n)`: it sizes its buffer from the header's frame count.
                block = np.empty((DECODE_BLOCK_FRAMES, self.facts.channels), dtype=dtype)
                count = self._file.buffer_read_into(block, dtype=dtype)
            except sf.LibsndfileError as exc:
                raise _corrupt(self._container, exc.error_string) from None
            if count == 0:
                return
            yield block[:count]

    def __enter__(self) -> "_SndfileStream":
        return self

    def __exit__(self, *exc_info: tp.Any) -> None:
        self._file.close()


class _FFmpegStream:
    """FFmpeg's decode (PyAV) of the first audio stream, through exactly one demuxer."""

    def __init__(self, path: Path, container: Container):
        self._container = container
        av.logging.set_level(av.logging.ERROR)  # FFmpeg's reasons reach `Capture`, not stderr
        self._raw = open(path, "rb")
        self._input = None
        self._logs = av.logging.Capture()
        try:
            with self._logs:
                # Tags are not ours to judge: undecodable bytes in them must not fail the upload.
                self._input = av.open(self._raw, mode="r", format=container.demuxer, options=FFMPEG_OPTIONS,
                                      metadata_errors="replace")
                self.facts = self._stream_facts(path)
        except DECODER_ERRORS as exc:
            self.close()
            raise _corrupt(container, self._reason(exc)) from None
        except BaseException:
            self.close()
            raise

    def _stream_facts(self, path: Path) -> StreamFacts:
        """The first audio stream's facts, once its codec is one the container may hold."""
        container = self._container
        streams = self._input.streams.audio
        if not streams:
            others = len(self._input.streams)
            raise NoAudioStream(f"the {container.name} file has no audio stream"
                                + (f" (only {others} video or other stream(s))" if others else ""))
        self._stream = streams[0]
        context = self._stream.codec_context
        name = context.name if context is not None else "of a codec FFmpeg does not know"
        if name not in container.codecs:
            raise UnsupportedCodec(f"the {container.name} file's first audio stream is {name}; in "
                                   f"{container.name} only {', '.join(sorted(set(container.codecs.values())))} "
                                   "are supported")
        codec = container.codecs[name]
        lossy = name not in LOSSLESS_CODECS
        if name == "aac":
            profile = context.profile or "LC"
            if profile not in AAC_PROFILES:
                raise UnsupportedCodec(f"the file's audio is AAC of the {profile} profile; AAC-LC, "
                                       "HE-AAC and HE-AACv2 are supported")
            codec = AAC_PROFILES[profile]
        if lossy:
            decoded = "FLOAT"
        else:
            bits = _lossless_bits(path, name, context)
            codec = f"{codec}_{bits}" if name == "alac" else f"PCM_{bits}"
            decoded = "PCM_16" if bits <= 16 else "PCM_24" if bits <= 24 else "PCM_32"
        return StreamFacts(codec=codec, samplerate=context.sample_rate, channels=context.channels,
                           decoded_subtype=decoded, lossy=lossy)

    def _reason(self, exc: Exception) -> str:
        """FFmpeg's own words (what it logged), else the error's."""
        said = list(dict.fromkeys(message.strip() for _level, _name, message in self._logs.logs
                                  if message.strip()))
        return "; ".join(said[-3:]) or getattr(exc, "strerror", None) or str(exc)

    def blocks(self) -> tp.Iterator[np.ndarray]:
        """Decoded frames gathered into blocks of up to `DECODE_BLOCK_FRAMES` (codec frames
        are ~1000 samples: handing each on alone would cost more than decoding it). The
        block's buffer is reused: each must be consumed before the next is asked for."""
        block: tp.Optional[np.ndarray] = None
        filled = 0
        try:
            with self._logs:
                for packet in self._input.demux(self._stream):
                    for frame in packet.decode():
                        self._check_frame(frame)
                        dtype = _block_dtype(frame, integer=self.facts.decoded_subtype != "FLOAT")
                        if block is not None and (filled + frame.samples > len(block) or block.dtype != dtype):
                            yield block[:filled]
                            filled = 0
                        if block is None or block.dtype != dtype or frame.samples > len(block):
                            block = np.empty((max(DECODE_BLOCK_FRAMES, frame.samples), self.facts.channels),
                                             dtype=dtype)
                        _copy_frame(frame, block[filled:filled + frame.samples])
                        filled += frame.samples
            if block is not None and filled:
                yield block[:filled]
        except DECODER_ERRORS as exc:
            raise _corrupt(self._container, self._reason(exc)) from None

    def _check_frame(self, frame: tp.Any) -> None:
        name, facts = self._container.name, self.facts
        if frame.sample_rate != facts.samplerate:
            raise CorruptAudio(f"the {name} stream changes its sample rate from {facts.samplerate} "
                               f"to {frame.sample_rate} Hz")
        if len(frame.layout.channels) != facts.channels:
            raise CorruptAudio(f"the {name} stream changes from {facts.channels} to "
                               f"{len(frame.layout.channels)} channels")

    def close(self) -> None:
        if self._input is not None:
            self._input.close()
        self._raw.close()

    def __enter__(self) -> "_FFmpegStream":
        return self

    def __exit__(self, *exc_info: tp.Any) -> None:
        self.close()


SAMPLE_DTYPES = {"s16": np.int16, "s32": np.int32, "flt": np.float32, "dbl": np.float64}
"""numpy types of FFmpeg's sample formats (planar ones end in `p`) a decoder here gives."""


def _block_dtype(frame: tp.Any, integer: bool) -> np.dtype:
    """The type a frame's samples are kept as: float32 for lossy codecs, else the decoder's
    int16 or int32 (FFmpeg keeps 20- and 24-bit samples in the top bits of s32, as
    libsndfile takes them)."""
    source = SAMPLE_DTYPES.get(frame.format.name.rstrip("p"))
    if source is None or (integer and source not in (np.int16, np.int32)):
        raise CorruptAudio(f"the decoder gave samples in a format the service does not read "
                           f"({frame.format.name})")
    return np.dtype(source if integer else np.float32)


def _copy_frame(frame: tp.Any, out: np.ndarray) -> None:
    """Copy a decoded frame into `out` (`[frame.samples, channels]`), converting to its type.

    Read plane by plane, never with `to_ndarray`: PyAV counts a ninth plane in an 8-channel
    planar frame (it reads past FFmpeg's 8 data pointers) and crashes reading it.
    """
    source = SAMPLE_DTYPES[frame.format.name.rstrip("p")]
    samples, channels = out.shape
    planes = frame.planes
    if frame.format.is_planar:
        for channel in range(channels):
            out[:, channel] = np.frombuffer(planes[channel], dtype=source, count=samples)
    else:
        out[:] = np.frombuffer(planes[0], dtype=source, count=samples * channels).reshape(samples, channels)


def _lossless_bits(path: Path, codec: str, context: tp.Any) -> int:
    """The source's bit depth: FLAC's STREAMINFO or ALAC's magic cookie; from the decoder's
    sample format when neither says."""
    if codec == "flac":
        with open(path, "rb") as file:
            head = file.read(26)
        if len(head) >= 26 and head[4] & 0x7F == 0:  # STREAMINFO is the first metadata block
            packed = struct.unpack(">Q", head[18:26])[0]
            return ((packed >> 36) & 0x1F) + 1
    elif codec == "alac":
        cookie = bytes(context.extradata or b"")
        offset = cookie.find(b"alac")
        if offset >= 0 and len(cookie) >= offset + 4 + 4 + 6:
            # The 'alac' atom: version (4 bytes), frame length (4), compatible version (1), bit depth (1).
            return cookie[offset + 4 + 4 + 5]
    sample_format = context.format.name if context.format is not None else ""
    return 16 if sample_format.startswith("s16") else 32


def _corrupt(container: Container, reason: str) -> CorruptAudio:
    reason = (reason or "unknown decoder error").strip().rstrip(".")
    return CorruptAudio(f"the {container.name} file could not be decoded: {reason}")
