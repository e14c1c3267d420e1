"""What a job's stems are written as: container, sample format, rate, channels, clipping.

The API parses the form fields once, resolves them against the input (so "the input's
own" becomes a concrete format) and stores the result in the job record; the worker
only reads the resolved options.
"""
from __future__ import annotations

import dataclasses
import typing as tp

from demix.audio.io import AudioInfo
from demix.errors import BadRequest, shown

FORMATS = ("wav", "flac", "mp3")
SAMPLE_FORMATS = ("pcm16", "pcm24", "float32")
CLIP_MODES = ("clamp", "rescale")
CHANNEL_MODES = ("input", "stereo")

SUBTYPES = {"pcm16": "PCM_16", "pcm24": "PCM_24", "float32": "FLOAT"}
"""libsndfile subtype of each sample format."""

MIME_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg"}

MP3_SAMPLERATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
"""Rates MPEG-1/2/2.5 layer III can store."""

MP3_BITRATES = (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
"""Constant bitrates (kbit/s) of MPEG-1 layer III."""

MIN_SAMPLERATE, MAX_SAMPLERATE = 8000, 192000


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """Resolved output settings of one job (no "same as input" left in them)."""
    format: str = "wav"
    sample_format: str = "pcm16"  # for mp3: what the encoder is fed; mp3 decodes to float
    samplerate: int = 44100
    channels: int = 2
    channel_mode: str = "input"  # "stereo": stems of the ITU downmix
    bitrate: int = 320  # kbit/s, mp3 only
    clip: str = "clamp"  # integer outputs never wrap: clamp each sample, or one gain for all stems

    @property
    def subtype(self) -> str:
        """libsndfile subtype to write."""
        return "MPEG_LAYER_III" if self.format == "mp3" else SUBTYPES[self.sample_format]

    @property
    def grid_subtype(self) -> str:
        """The sample grid stems are computed on: the PCM format itself when samples can
        be clamped as they are written, float otherwise (MP3 is encoded from float;
        rescaling needs every stem's peak first)."""
        if self.format == "mp3" or (self.clip == "rescale" and self.clips):
            return "FLOAT"
        return SUBTYPES[self.sample_format]

    @property
    def extension(self) -> str:
        return self.format

    @property
    def mime_type(self) -> str:
        return MIME_TYPES[self.format]

    @property
    def clips(self) -> bool:
        """Whether samples beyond full scale would clip (everything but float WAV)."""
        return not (self.format == "wav" and self.sample_format == "float32")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: tp.Mapping[str, tp.Any]) -> "OutputOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def default_format(info: AudioInfo) -> str:
    """The stems' container when the request names none: FLAC for a FLAC input (whoever
    keeps music as FLAC wants FLAC back), WAV for everything else."""
    return "flac" if info.container == "FLAC" else "wav"


def default_sample_format(info: AudioInfo) -> str:
    """The stems' sample format when the request names none.

    Lossless inputs keep their own: 16/24-bit PCM kept; narrower or companded inputs
    (8-bit, μ-law, A-law, ADPCM) give 16-bit; 32-bit PCM and float give float32 (FLAC
    stems then 24-bit, see `resolve_output`). A lossy input (MP3, AAC, Vorbis, Opus) has
    no bit depth of its own: its stems are 24-bit, the DAW's working format, whose
    steps lie far below any codec's noise.
    """
    if info.lossy:
        return "pcm24"
    subtype = info.sample_subtype
    if subtype == "PCM_24":
        return "pcm24"
    if subtype in ("PCM_32", "FLOAT", "DOUBLE"):
        return "float32"
    return "pcm16"


def resolve_output(form: tp.Mapping[str, str], info: AudioInfo) -> OutputOptions:
    """Validate the output form fields against the input and fill in the defaults.

    Raises:
        BadRequest: a field has an unknown value or the combination cannot be written
            (the message says which and what would work).
    """
    def field(name: str, default: str) -> str:
        return (form.get(name) or default).strip().lower()

    fmt = _choice("format", field("format", default_format(info)), FORMATS)
    clip = _choice("clip", field("clip", "clamp"), CLIP_MODES)
    channel_mode = _choice("channels", field("channels", "input"), CHANNEL_MODES)
    channels = 2 if channel_mode == "stereo" else info.channels

    requested_format = field("sample_format", "")
    if requested_format:
        sample_format = _choice("sample_format", requested_format, SAMPLE_FORMATS)
    else:
        sample_format = default_sample_format(info)

    raw_rate = field("samplerate", "input")
    if raw_rate == "input":
        samplerate = info.samplerate
        if fmt == "mp3" and samplerate not in MP3_SAMPLERATES:
            # MP3 cannot store this rate; take the highest rate it can that does not exceed it.
            samplerate = max([r for r in MP3_SAMPLERATES if r <= samplerate] or [MP3_SAMPLERATES[0]])
    else:
        try:
            samplerate = int(raw_rate)
        except ValueError:
            raise BadRequest(f"samplerate must be 'input' or a rate in Hz, not {shown(raw_rate)}",
                             code="invalid_output") from None
        if not MIN_SAMPLERATE <= samplerate <= MAX_SAMPLERATE:
            raise BadRequest(f"samplerate {samplerate} is outside {MIN_SAMPLERATE}..{MAX_SAMPLERATE} Hz",
                             code="invalid_output")

    # Checked whatever the format (the spec says which values exist), used only by MP3.
    try:
        bitrate = int(field("bitrate", "320"))
    except ValueError:
        bitrate = -1
    if bitrate not in MP3_BITRATES:
        raise BadRequest(f"bitrate must be one of {', '.join(map(str, MP3_BITRATES))} (kbit/s)",
                         code="invalid_output")
    if fmt == "mp3":
        if samplerate not in MP3_SAMPLERATES:
            raise BadRequest(f"MP3 cannot store {samplerate} Hz; use one of "
                             f"{', '.join(map(str, MP3_SAMPLERATES))}", code="invalid_output")
        if channels > 2:
            raise BadRequest(f"MP3 holds at most two channels and the input has {channels}; "
                             "ask for channels=stereo (a downmix) or format=wav/flac",
                             code="invalid_output")
        if requested_format:
            raise BadRequest("sample_format does not apply to mp3 (it decodes to float)",
                             code="invalid_output")
        sample_format = "pcm16"
    elif fmt == "flac" and sample_format == "float32":
        if requested_format:
            raise BadRequest("FLAC stores integer samples only: use sample_format=pcm16 or pcm24",
                             code="invalid_output")
        sample_format = "pcm24"  # the closest FLAC gets to a float input
    return OutputOptions(format=fmt, sample_format=sample_format, samplerate=samplerate,
                         channels=channels, channel_mode=channel_mode, bitrate=bitrate, clip=clip)


def _choice(name: str, value: str, choices: tp.Sequence[str]) -> str:
    if value not in choices:
        raise BadRequest(f"unknown {name} value {shown(value)}; expected one of {', '.join(choices)}",
                         code="invalid_output")
    return value


def default_output(info: AudioInfo) -> OutputOptions:
    """The output options of a request that set none: the input's own format, rate and channels."""
    return resolve_output({}, info)
