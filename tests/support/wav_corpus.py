"""The WAV corpus: files real tools write, odd but valid, and refused ones, built with
soundfile and hand-written headers (never committed binaries). tests/intake/test_inspection.py reads
them directly; tests/api/test_api_errors.py sends them over HTTP."""
from __future__ import annotations

import struct
import typing as tp

import numpy as np

from demix.intake import inspection as intake
from testkit.synthetic_audio import music_like

STREAMED = 0xFFFFFFFF
"""The `data` (and RIFF) size `ffmpeg -f wav pipe:` leaves, unable to seek back."""
MP3_FRAME = bytes([0xFF, 0xFB, 0x90, 0x64]) + bytes(413)


# ---- the corpus: hand-written headers -------------------------------------------------

def chunk(tag: bytes, body: bytes, endian: str = "<") -> bytes:
    """A RIFF chunk, with the pad byte an odd-sized body needs."""
    return tag + struct.pack(endian + "I", len(body)) + body + b"\0" * (len(body) % 2)


def fmt_chunk(channels: int = 2, samplerate: int = 44100, bits: int = 16, tag: int = 1,
              block_align: tp.Optional[int] = None, endian: str = "<") -> bytes:
    if block_align is None:
        block_align = channels * ((bits + 7) // 8)
    return chunk(b"fmt ", struct.pack(endian + "HHIIHH", tag, channels, samplerate,
                                      samplerate * block_align, block_align, bits), endian)


def riff(*chunks: bytes, magic: bytes = b"RIFF", size: tp.Optional[int] = None,
         endian: str = "<") -> bytes:
    """A whole file: the RIFF header (`size` overrides the true size), then `chunks`."""
    body = b"WAVE" + b"".join(chunks)
    return magic + struct.pack(endian + "I", len(body) if size is None else size) + body


def data_header(size: int) -> bytes:
    """A `data` chunk header alone, for sizes that do not match what follows."""
    return b"data" + struct.pack("<I", size)


def pcm16(frames: int = 1000, channels: int = 2, seed: int = 0) -> np.ndarray:
    """`[frames, channels]` int16 samples of a music-like signal."""
    return np.round(music_like(44100, channels, frames / 44100, seed)[:frames] * 2 ** 15).astype("<i2")


SAMPLES = pcm16()


def plain_wav(samples: np.ndarray = SAMPLES) -> bytes:
    return riff(fmt_chunk(channels=samples.shape[1]), chunk(b"data", samples.tobytes()))


def rf64_header(data_size: int = 0, riff_size: int = 0, frames: int = 0, before_fmt: bytes = b"") -> bytes:
    """An RF64 header up to the samples; sizes of 0 are what `ffmpeg -rf64 always` leaves in a pipe."""
    ds64 = chunk(b"ds64", struct.pack("<QQQI", riff_size, data_size, frames, 0))
    return (b"RF64" + struct.pack("<I", STREAMED) + b"WAVE" + ds64 + before_fmt + fmt_chunk()
            + data_header(STREAMED))


def rf64_wav() -> bytes:
    """A complete RF64 file holding SAMPLES, with its `ds64` sizes filled in."""
    riff_size = len(rf64_header()) - 8 + SAMPLES.nbytes
    return rf64_header(SAMPLES.nbytes, riff_size, len(SAMPLES)) + SAMPLES.tobytes()


def info_list(text: bytes) -> bytes:
    """A LIST/INFO chunk with one odd-sized software tag, so it needs a pad byte."""
    return chunk(b"LIST", b"INFO" + chunk(b"ISFT", text))


# name -> the file's bytes; each holds exactly SAMPLES (1000 stereo 16-bit frames at 44.1 kHz)
ODD_VALID_WAVS: dict[str, tp.Callable[[], bytes]] = {
    "data size 0 (streamed)": lambda: riff(fmt_chunk(), data_header(0) + SAMPLES.tobytes(), size=0),
    "data size 0xFFFFFFFF (ffmpeg pipe)": lambda: riff(
        fmt_chunk(), data_header(STREAMED) + SAMPLES.tobytes(), size=STREAMED),
    "streamed with an odd trailing byte": lambda: riff(
        fmt_chunk(), data_header(STREAMED) + SAMPLES.tobytes() + b"\x01", size=STREAMED),
    "RF64 with ds64 sizes 0 (ffmpeg -rf64 pipe)": lambda: rf64_header() + SAMPLES.tobytes(),
    "RF64 with its sizes filled in": rf64_wav,
    "RF64 with an odd-sized chunk (pad byte)": lambda: rf64_header(
        before_fmt=chunk(b"bext", b"abc")) + SAMPLES.tobytes(),
    "BW64": lambda: b"BW64" + rf64_wav()[4:],
    "chunks before and after fmt and data": lambda: riff(
        chunk(b"JUNK", bytes(28)), chunk(b"bext", bytes(602)), fmt_chunk(),
        chunk(b"iXML", b"<BWFXML/>"), info_list(b"demix"), chunk(b"data", SAMPLES.tobytes()),
        info_list(b"tail"), chunk(b"JUNK", b"odd")),
    "odd-sized chunks with pad bytes": lambda: riff(
        chunk(b"LIST", b"abc"), fmt_chunk(), chunk(b"JUNK", b"x"), chunk(b"data", SAMPLES.tobytes())),
    "trailing garbage after data": lambda: plain_wav() + b"\x07garbage that is no chunk",
    "RIFF size wrong": lambda: riff(fmt_chunk(), chunk(b"data", SAMPLES.tobytes()), size=12345),
    "WAVE_FORMAT_EXTENSIBLE by hand": lambda: riff(
        chunk(b"fmt ", struct.pack("<HHIIHHHHI", 0xFFFE, 2, 44100, 44100 * 4, 4, 16, 22, 16, 3)
              + struct.pack("<I", 1) + intake.KSDATAFORMAT_GUID_TAIL),
        chunk(b"data", SAMPLES.tobytes())),
    "big-endian RIFX": lambda: riff(fmt_chunk(endian=">"),
                                    chunk(b"data", SAMPLES.astype(">i2").tobytes(), ">"),
                                    magic=b"RIFX", endian=">"),
}


NOT_AUDIO = {
    "html page": (b"<!DOCTYPE html><html><body>404</body></html>", ["HTML"]),
    "avi": (b"RIFF\x40\x00\x00\x00AVI LIST" + bytes(64), ["'AVI '"]),
    "riff cut off": (b"RIFF\x40\x00", ["cut off inside its RIFF header"]),
    "empty file": (b"", ["empty"]),
    "png": (b"\x89PNG\r\n\x1a\n" + bytes(64), ["PNG image"]),
    "midi": (b"MThd\x00\x00\x00\x06\x00\x01\x00\x02\x01\xe0MTrk" + bytes(32), ["MIDI"]),
    "hls playlist": (b"#EXTM3U\n#EXT-X-VERSION:3\n#EXTINF:10,\nfile:///etc/passwd\n", ["M3U/HLS playlist"]),
    "concat list": (b"ffconcat version 1.0\nfile '/etc/passwd'\n", ["concat list"]),
    "sdp": (b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nm=audio 5004 RTP/AVP 0\n", ["SDP"]),
    "url": (b"http://127.0.0.1/song.mp3\n", ["URL"]),
    "an ID3 tag before no MP3": (b"ID3\x04\x00\x00\x00\x00\x00\x0a" + bytes(10) + b"<html>", ["ID3 tag", "HTML"]),
}
"""Files of no format the service reads, with what the refusal says they look like."""


def ima_adpcm_with_block_align(block_align: int) -> bytes:
    fmt = struct.pack("<HHIIHHHH", 0x11, 2, 44100, 44251, block_align, 4, 2, 2041)
    return riff(chunk(b"fmt ", fmt), chunk(b"data", bytes(2048)))


MPEG_IN_WAV = riff(chunk(b"fmt ", struct.pack("<HHIIHHH", 0x55, 2, 44100, 16000, 1, 0, 12) + bytes(12)),
                   chunk(b"data", MP3_FRAME * 4))

UNDECODABLE = {
    "RIFF header alone": (b"RIFF\x04\x00\x00\x00WAVE", ["no 'fmt ' chunk", "ends at byte 12"]),
    "cut off inside fmt": (plain_wav()[:30], ["'fmt ' chunk is cut off"]),
    "fmt missing": (riff(chunk(b"data", SAMPLES.tobytes())), ["no 'fmt ' chunk before its 'data' chunk"]),
    "data missing": (riff(fmt_chunk(), chunk(b"LIST", b"INFO")), ["no 'data' chunk"]),
    "fmt too short": (riff(chunk(b"fmt ", bytes(14)), chunk(b"data", bytes(4))), ["14 bytes", "16"]),
    "block align 0": (riff(fmt_chunk(block_align=0), chunk(b"data", SAMPLES.tobytes())),
                      ["0-byte frames", "takes 4 bytes"]),
    "block align too small": (riff(fmt_chunk(block_align=3), chunk(b"data", SAMPLES.tobytes())),
                              ["3-byte frames", "2 channel(s) of 16-bit PCM takes 4 bytes"]),
    "24-bit in 4-byte frames": (riff(fmt_chunk(channels=1, bits=24, block_align=4),
                                     chunk(b"data", bytes(400))), ["4-byte frames", "takes 3 bytes"]),
    "16-bit μ-law": (riff(fmt_chunk(tag=7, bits=16), chunk(b"data", bytes(400))), ["μ-law", "takes 2 bytes"]),
    "IMA ADPCM block align 0": (ima_adpcm_with_block_align(0),
                                ["Unspecified internal error", "IMA ADPCM", "block align 0"]),
    "MPEG in WAV": (MPEG_IN_WAV, ["its audio is MP3 (format tag 0x0055)", "not supported", "PCM"]),
    "unknown codec": (riff(fmt_chunk(tag=0x1234), chunk(b"data", bytes(400))),
                      ["unknown encoding", "0x1234"]),
    "extensible, unknown sub-format": (riff(
        chunk(b"fmt ", struct.pack("<HHIIHHHHI", 0xFFFE, 4, 48000, 48000 * 8, 8, 16, 22, 16, 0)
              + bytes.fromhex("01000000 2107 d311 8644 c8c1ca000000")), chunk(b"data", bytes(800))),
        ["sub-format 00000001-0721-11d3-8644-c8c1ca000000", "not supported"]),
    "zero channels": (riff(fmt_chunk(channels=0, block_align=0), chunk(b"data", bytes(4))),
                      ["zero channels"]),
    "zero sample rate": (riff(fmt_chunk(samplerate=0), chunk(b"data", bytes(4))), ["0 Hz"]),
    "64-bit integer PCM": (riff(fmt_chunk(bits=64), chunk(b"data", bytes(1600))),
                           ["unimplemented format", "64-bit"]),
    "RF64 without ds64": (b"RF64" + riff(fmt_chunk(), chunk(b"data", bytes(4)))[4:], ["no 'ds64' chunk"]),
}
