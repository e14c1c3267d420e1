"""Test audio in every accepted format, made by the real encoders users' files come from
(Debian's ffmpeg, lame, flac, opusenc, oggenc; `.ci/run` installs them), and FFmpeg's own
decode of a file as the reference intake is held to."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import typing as tp
from pathlib import Path

import numpy as np

from testkit.synthetic_audio import write_wav

ENCODERS = ("ffmpeg", "ffprobe", "lame", "flac", "opusenc", "oggenc")


def require_encoders() -> None:
    """Fail (not skip) when an encoder is missing: the format tests are the feature's proof."""
    missing = [tool for tool in ENCODERS if shutil.which(tool) is None]
    assert not missing, (f"encoders missing: {', '.join(missing)}; install them with `apt-get install "
                         "ffmpeg lame flac opus-tools vorbis-tools` (.ci/run does)")


def run(*command: tp.Union[str, Path]) -> None:
    subprocess.run([str(part) for part in command], check=True, capture_output=True)


def ffmpeg(*arguments: tp.Union[str, Path]) -> None:
    run("ffmpeg", "-nostdin", "-v", "error", "-y", *arguments)


@dataclasses.dataclass(frozen=True)
class Encoded:
    """How to make one test file, and what intake must call it."""
    suffix: str
    make: tp.Callable[[Path, Path], None]  # (source WAV, target)
    input_format: str
    samplerate: int = 44100
    channels: int = 2
    seconds: float = 1.5
    source_subtype: str = "PCM_16"
    lossy: bool = True

    def write(self, folder: Path, name: str) -> Path:
        source = write_wav(folder / f"{name}.source.wav", self.samplerate, self.channels, self.seconds,
                           subtype=self.source_subtype)
        target = folder / f"{name}.{self.suffix}"
        self.make(source, target)
        return target


def _lame(*options: str) -> tp.Callable[[Path, Path], None]:
    return lambda source, target: run("lame", "--quiet", *options, source, target)


def _ffmpeg(*options: str) -> tp.Callable[[Path, Path], None]:
    return lambda source, target: ffmpeg("-i", source, *options, target)


def _with_video(*options: str) -> tp.Callable[[Path, Path], None]:
    """A video file: a test picture, then the audio (so audio is not the first stream)."""
    return lambda source, target: ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=10", "-i", source,
                                         "-map", "0:v", "-map", "1:a", "-shortest", *options, target)


def _flac_piped(source: Path, target: Path) -> None:
    """A FLAC as `ffmpeg -f flac pipe:` writes it: STREAMINFO without a total length."""
    with open(target, "wb") as out:
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(source), "-f", "flac", "pipe:"],
                       stdout=out, check=True)


FORMATS: dict[str, Encoded] = {
    "flac 16-bit": Encoded("flac", lambda s, t: run("flac", "-s", "-f", s, "-o", t), "FLAC/PCM_16", lossy=False),
    "flac 24-bit 48 kHz": Encoded("flac", lambda s, t: run("flac", "-s", "-f", s, "-o", t), "FLAC/PCM_24",
                                  samplerate=48000, source_subtype="PCM_24", lossy=False),
    "flac 8-bit mono": Encoded("flac", lambda s, t: run("flac", "-s", "-f", s, "-o", t), "FLAC/PCM_8",
                               channels=1, source_subtype="PCM_U8", lossy=False),
    "flac piped by ffmpeg": Encoded("flac", _flac_piped, "FLAC/PCM_16", lossy=False),
    "mp3 cbr (lame)": Encoded("mp3", _lame("-b", "192"), "MP3/MPEG_LAYER_III"),
    "mp3 vbr with LAME header": Encoded("mp3", _lame("-V", "2"), "MP3/MPEG_LAYER_III"),
    "mp3 with ID3v1 and ID3v2": Encoded("mp3", _lame("--add-id3v2", "--tt", "Song", "--ta", "Band"),
                                        "MP3/MPEG_LAYER_III"),
    "mp3 without Xing header": Encoded("mp3", _lame("-t", "-b", "128"), "MP3/MPEG_LAYER_III"),
    "mp3 mpeg-2 mono 22.05 kHz": Encoded("mp3", _lame("-m", "m", "-b", "64"), "MP3/MPEG_LAYER_III",
                                         samplerate=22050, channels=1),
    "mp3 (ffmpeg libmp3lame)": Encoded("mp3", _ffmpeg("-c:a", "libmp3lame", "-q:a", "4"), "MP3/MPEG_LAYER_III"),
    "ogg vorbis (oggenc)": Encoded("ogg", lambda s, t: run("oggenc", "-Q", s, "-o", t), "OGG/VORBIS"),
    "opus (opusenc)": Encoded("opus", lambda s, t: run("opusenc", "--quiet", s, t), "OGG/OPUS"),
    "opus 5.1 (opusenc)": Encoded("opus", lambda s, t: run("opusenc", "--quiet", s, t), "OGG/OPUS",
                                  samplerate=48000, channels=6),
    "vorbis 7.1 (oggenc)": Encoded("ogg", lambda s, t: run("oggenc", "-Q", s, "-o", t), "OGG/VORBIS",
                                   samplerate=48000, channels=8, seconds=0.5),
    "aiff 16-bit": Encoded("aiff", _ffmpeg("-c:a", "pcm_s16be"), "AIFF/PCM_16", lossy=False),
    "aiff-c float": Encoded("aifc", _ffmpeg("-c:a", "pcm_f32be", "-f", "aiff"), "AIFF-C/FLOAT",
                            samplerate=48000, source_subtype="FLOAT", lossy=False),
    "m4a aac-lc": Encoded("m4a", _ffmpeg("-c:a", "aac", "-b:a", "128k"), "MP4/AAC_LC"),
    "m4a aac-lc faststart": Encoded("m4a", _ffmpeg("-c:a", "aac", "-movflags", "+faststart"), "MP4/AAC_LC",
                                    samplerate=48000),
    "m4a alac 16-bit": Encoded("m4a", _ffmpeg("-c:a", "alac"), "MP4/ALAC_16", lossy=False),
    "m4a alac 24-bit": Encoded("m4a", _ffmpeg("-c:a", "alac"), "MP4/ALAC_24", samplerate=96000,
                               source_subtype="PCM_24", lossy=False),
    "webm opus": Encoded("webm", _ffmpeg("-c:a", "libopus"), "WEBM/OPUS"),
    "webm vorbis": Encoded("webm", _ffmpeg("-c:a", "libvorbis"), "WEBM/VORBIS"),
    "mka opus": Encoded("mka", _ffmpeg("-c:a", "libopus"), "MATROSKA/OPUS", channels=1),
    "mp4 video with aac": Encoded("mp4", _with_video("-c:v", "mpeg4", "-c:a", "aac"), "MP4/AAC_LC"),
    "mkv video with vorbis": Encoded("mkv", _with_video("-c:v", "mpeg4", "-c:a", "libvorbis"), "MATROSKA/VORBIS"),
    "webm video with opus": Encoded("webm", _with_video("-c:v", "libvpx", "-c:a", "libopus"), "WEBM/OPUS"),
}
"""Every accepted non-WAV format (HE-AAC is missing: no free HE-AAC encoder is packaged)."""


@dataclasses.dataclass(frozen=True)
class Decoded:
    """FFmpeg's decode of a file's first audio stream."""
    samples: np.ndarray  # [frames, channels] float32
    samplerate: int


def ffmpeg_decode(path: Path) -> Decoded:
    """`ffmpeg -i IN -map 0:a:0 -f f32le -`: the reference every decode is checked against."""
    probe = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries",
                            "stream=channels,sample_rate", "-of", "json", str(path)],
                           check=True, capture_output=True, text=True).stdout
    stream = json.loads(probe)["streams"][0]
    samplerate, channels = int(stream["sample_rate"]), int(stream["channels"])
    raw = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0",
                          "-f", "f32le", "-"], check=True, capture_output=True).stdout
    return Decoded(np.frombuffer(raw, dtype="<f4").reshape(-1, channels), samplerate)
