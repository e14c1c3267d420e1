"""Intake of every non-WAV format: files from real encoders decode to exactly FFmpeg's
decode (length, alignment, samples), become the job's WAV, and hostile files are refused
with a clean 4xx naming what is wrong."""
from __future__ import annotations

import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from demix.audio import decoders
from demix.config import Settings
from demix.errors import (CorruptAudio, InsufficientStorage, InvalidAudio, NoAudioStream, UnsupportedCodec,
                          UnsupportedMediaType)
from demix.intake.inspection import inspect_upload
from tests.support.encoded_audio import FORMATS, Encoded, ffmpeg, ffmpeg_decode, require_encoders, run
from tests.support.small_disk import mounted_tmpfs

pytestmark = pytest.mark.processes

SETTINGS = Settings()


@pytest.fixture(scope="module", autouse=True)
def _encoders() -> None:
    require_encoders()


def upload_copy(path: Path, tmp_path: Path) -> Path:
    """The file as the API keeps an upload: no telling name, in the service's own folder."""
    upload = tmp_path / "incoming" / "upload"
    upload.parent.mkdir(exist_ok=True)
    shutil.copyfile(path, upload)
    return upload


def assert_matches_ffmpeg(wav: Path, reference_path: Path, lossless: bool) -> None:
    """The WAV holds FFmpeg's decode: the same frame count, aligned, the same samples (float
    rounding apart for lossy codecs, where libsndfile's decoders are not FFmpeg's)."""
    reference = ffmpeg_decode(reference_path)
    samples, samplerate = sf.read(str(wav), dtype="float32", always_2d=True)
    assert samplerate == reference.samplerate
    assert samples.shape == reference.samples.shape
    if lossless:
        np.testing.assert_array_equal(samples, reference.samples)
    else:
        assert np.abs(samples - reference.samples).max() < 1e-6
    # Aligned: a shift by one frame either way is far worse than what is there.
    shifted = np.abs(samples[1:] - reference.samples[:-1]).max()
    assert np.abs(samples - reference.samples).max() < shifted / 100


@pytest.mark.parametrize("case", list(FORMATS))
def test_every_format_decodes_to_exactly_ffmpegs_decode(tmp_path, case):
    encoded: Encoded = FORMATS[case]
    original = encoded.write(tmp_path, "song")
    upload = upload_copy(original, tmp_path)

    info = inspect_upload(upload, SETTINGS)

    reference = ffmpeg_decode(original)
    assert info.input_format == encoded.input_format
    assert info.lossy is encoded.lossy
    assert (info.frames, info.samplerate, info.channels) == (len(reference.samples), reference.samplerate,
                                                             reference.samples.shape[1])
    wav = sf.info(str(upload))  # the upload itself is now the job's WAV
    assert wav.format in ("WAV", "RF64")  # RF64 when the longest accepted input would pass 4 GiB
    assert (wav.subtype, wav.frames) == (info.decoded_subtype, info.frames)
    assert info.decoded_subtype == ("FLOAT" if encoded.lossy else {
        "PCM_16": "PCM_16", "PCM_U8": "PCM_16", "PCM_24": "PCM_24", "FLOAT": "FLOAT"}[encoded.source_subtype])
    assert_matches_ffmpeg(upload, original, lossless=not encoded.lossy)
    assert sorted(p.name for p in upload.parent.iterdir()) == ["upload"]  # no decode left beside it


def test_gapless_mp3_and_opus_lose_their_encoder_delay_and_padding(tmp_path):
    """LAME's header and Opus's pre-skip say how much of the decode is codec padding:
    what remains is exactly the source's length."""
    for case in ("mp3 vbr with LAME header", "mp3 cbr (lame)", "opus (opusenc)"):
        encoded = FORMATS[case]
        upload = upload_copy(encoded.write(tmp_path, "song"), tmp_path)
        source_frames = round(encoded.seconds * encoded.samplerate)
        expected = source_frames * 48000 // encoded.samplerate if case.startswith("opus") else source_frames
        assert inspect_upload(upload, SETTINGS).frames == expected, case


def test_the_first_audio_stream_of_several_is_taken(tmp_path):
    first = FORMATS["m4a aac-lc"].write(tmp_path, "first")
    second = FORMATS["flac 24-bit 48 kHz"].write(tmp_path, "second")
    both = tmp_path / "two.mkv"
    # The second stream has more channels and a higher rate: FFmpeg's own pick would be it.
    ffmpeg("-i", first, "-i", second, "-map", "0:a", "-map", "1:a", "-c:a", "libvorbis", "-ac:1", "6", both)
    upload = upload_copy(both, tmp_path)
    info = inspect_upload(upload, SETTINGS)
    assert (info.input_format, info.channels, info.samplerate) == ("MATROSKA/VORBIS", 2, 44100)
    assert_matches_ffmpeg(upload, both, lossless=False)


# ---- the truth, not the header -----------------------------------------------------------

def silent_flac(path: Path, seconds: int, samplerate: int = 8000) -> Path:
    """A FLAC of digital silence from the `flac` encoder: ~80 kB an hour."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as out:
        out.truncate(seconds * samplerate * 2)  # sparse zeros: no memory, no disk
    run("flac", "-s", "-f", "--force-raw-format", "--endian=little", "--sign=signed", "--channels=1",
        "--bps=16", f"--sample-rate={samplerate}", raw, "-o", path)
    raw.unlink()
    return path


def test_a_silence_bomb_is_too_long_and_never_held_in_memory(tmp_path):
    bomb = silent_flac(tmp_path / "bomb.flac", seconds=5 * 3600)
    assert bomb.stat().st_size < 1024 * 1024  # five hours in under a megabyte
    upload = upload_copy(bomb, tmp_path)
    settings = Settings(max_duration_s=3600)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidAudio) as refused:
            inspect_upload(upload, settings)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.code == "too_long" and refused.value.http_status == 422
    assert "more than 3600 s" in refused.value.message and "DEMIX_MAX_DURATION_S" in refused.value.message
    assert peak < 8 * 2 ** 20  # the hour decoded before stopping is 55 MiB of samples
    assert upload.read_bytes() == bomb.read_bytes()  # the upload untouched, nothing beside it
    assert sorted(p.name for p in upload.parent.iterdir()) == ["upload"]


def flac_claiming(path: Path, total_frames: int) -> bytes:
    """The FLAC's bytes with STREAMINFO's total length replaced (it has no checksum)."""
    data = bytearray(path.read_bytes())
    packed = int.from_bytes(data[18:26], "big")
    packed = (packed & ~((1 << 36) - 1)) | total_frames
    data[18:26] = packed.to_bytes(8, "big")
    return bytes(data)


def test_a_header_claiming_three_hours_on_seconds_of_audio_is_not_believed(tmp_path):
    real = FORMATS["flac 16-bit"].write(tmp_path, "short")
    upload = tmp_path / "liar.flac"
    upload.write_bytes(flac_claiming(real, 3 * 3600 * 44100))
    info = inspect_upload(upload, SETTINGS)
    assert info.frames == round(1.5 * 44100) == sf.info(str(upload)).frames
    assert_matches_ffmpeg(upload, real, lossless=True)


def ogg_crc(page: bytes) -> int:
    """The Ogg page checksum: CRC-32, polynomial 0x04C11DB7, not reflected, starting at 0."""
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


def ogg_with_last_granule_scaled(path: Path, factor: float) -> bytes:
    """The Ogg file with its last page's granule position (which states the stream's
    length) multiplied by `factor`, its checksum made valid again."""
    data = bytearray(path.read_bytes())
    start = position = 0
    while position < len(data):
        start = position
        segments = data[position + 26]
        position += 27 + segments + sum(data[position + 27:position + 27 + segments])
    page = slice(start, position)
    granule = struct.unpack_from("<q", data, start + 6)[0]
    struct.pack_into("<qI", data, start + 6, int(granule * factor), 0)
    struct.pack_into("<I", data, start + 18, 0)
    struct.pack_into("<I", data, start + 22, ogg_crc(bytes(data[page])))
    return bytes(data)


@pytest.mark.parametrize("case", ["ogg vorbis (oggenc)", "opus (opusenc)"])
@pytest.mark.parametrize("factor", [0.5, 100])
def test_an_ogg_length_claim_is_not_believed(tmp_path, case, factor):
    """Its last granule position is all an Ogg file says of its length. FFmpeg, the
    reference, at most trims the last page's audio by it, and never pads: a claim of half
    the audio does not cut the rest (libsndfile would stop there), a claim of a hundred
    times adds nothing."""
    real = FORMATS[case].write(tmp_path, "real")
    real_frames = len(ffmpeg_decode(real).samples)
    liar = tmp_path / "liar.ogg"
    liar.write_bytes(ogg_with_last_granule_scaled(real, factor))
    upload = upload_copy(liar, tmp_path)
    info = inspect_upload(upload, SETTINGS)
    assert info.frames == len(ffmpeg_decode(liar).samples)
    assert info.frames <= real_frames  # never padded out to a claim
    if factor < 1:
        assert info.frames > real_frames * factor  # nor cut where a claim says
    assert_matches_ffmpeg(upload, liar, lossless=False)


def test_a_cut_mp3_is_accepted_up_to_its_last_whole_frame(tmp_path):
    """MP3 frames are independent: a file cut short is a shorter song, as FFmpeg decodes it,
    however long its Xing header says it is."""
    whole = FORMATS["mp3 vbr with LAME header"].write(tmp_path, "whole")
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    upload = upload_copy(cut, tmp_path)
    info = inspect_upload(upload, SETTINGS)
    assert 0 < info.frames < round(1.5 * 44100) * 0.7
    assert_matches_ffmpeg(upload, cut, lossless=False)


@pytest.mark.parametrize("case,cut_at,reason", [
    ("flac 16-bit", 0.6, "invalid residual"),
    ("m4a aac-lc faststart", 0.6, "Input buffer exhausted"),
])
def test_a_truncated_stream_is_422_with_the_decoders_reason(tmp_path, case, cut_at, reason):
    whole = FORMATS[case].write(tmp_path, "whole")
    upload = tmp_path / "upload"
    upload.write_bytes(whole.read_bytes()[:int(whole.stat().st_size * cut_at)])
    with pytest.raises(CorruptAudio) as refused:
        inspect_upload(upload, SETTINGS)
    assert refused.value.code == "corrupt_audio" and refused.value.http_status == 422
    assert "could not be decoded" in refused.value.message and reason in refused.value.message


# ---- hostile files ----------------------------------------------------------------------

def m4a_with_moov_at_the_end_cut(tmp_path: Path) -> bytes:
    whole = FORMATS["m4a aac-lc"].write(tmp_path, "whole")  # ffmpeg writes `moov` after `mdat`
    data = whole.read_bytes()
    assert data.index(b"moov") > data.index(b"mdat")
    return data[:data.index(b"moov") - 4]


def video_only_mp4(tmp_path: Path) -> bytes:
    target = tmp_path / "video.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=10:duration=1", "-c:v", "mpeg4", target)
    return target.read_bytes()


def png(tmp_path: Path) -> bytes:
    target = tmp_path / "cover.png"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:duration=0.1", "-frames:v", "1", target)
    return target.read_bytes()


def midi(tmp_path: Path) -> bytes:
    header = b"MThd" + (6).to_bytes(4, "big") + bytes([0, 0, 0, 1, 0, 96])
    notes = bytes([0x00, 0x90, 60, 100, 0x60, 0x80, 60, 0, 0x00, 0xFF, 0x2F, 0x00])
    return header + b"MTrk" + len(notes).to_bytes(4, "big") + notes


def sixteen_channels(tmp_path: Path) -> bytes:
    """FLAC stores at most eight channels: 16 come as Opus (mapping family 255), as
    opusenc writes them."""
    source = tmp_path / "sixteen.wav"
    sf.write(str(source), np.random.default_rng(0).uniform(-0.1, 0.1, (4800, 16)), 48000, subtype="PCM_16")
    target = tmp_path / "sixteen.opus"
    run("opusenc", "--quiet", source, target)
    return target.read_bytes()


def transcoded(suffix: str, *options: str):
    def make(tmp_path: Path) -> bytes:
        source = FORMATS["flac 16-bit"].write(tmp_path, "source")
        target = tmp_path / f"other.{suffix}"
        ffmpeg("-i", source, *options, target)
        return target.read_bytes()
    return make


HOSTILE = {
    "m3u8 naming a local file": (lambda tmp: b"#EXTM3U\n#EXTINF:5,\nfile:///etc/passwd\n", UnsupportedMediaType,
                                 "unsupported_format", "playlist"),
    "hls naming a url": (lambda tmp: b"#EXTM3U\n#EXT-X-TARGETDURATION:5\n#EXTINF:5,\nhttp://127.0.0.1:9/a.ts\n",
                         UnsupportedMediaType, "unsupported_format", "playlist"),
    "concat list": (lambda tmp: b"ffconcat version 1.0\nfile /etc/passwd\n", UnsupportedMediaType,
                    "unsupported_format", "concat list"),
    "sdp": (lambda tmp: b"v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 9 RTP/AVP 0\r\n", UnsupportedMediaType,
            "unsupported_format", "SDP"),
    "png renamed .mp3": (png, UnsupportedMediaType, "unsupported_format", "PNG image"),
    "midi renamed .mp3": (midi, UnsupportedMediaType, "unsupported_format", "MIDI"),
    "16 channels": (sixteen_channels, InvalidAudio, "too_many_channels", "16 channels"),
    "m4a cut before its moov": (m4a_with_moov_at_the_end_cut, CorruptAudio, "corrupt_audio", "moov atom not found"),
    "mp4 with only video": (video_only_mp4, NoAudioStream, "no_audio_stream", "no audio stream"),
    "ac-3 in mp4": (transcoded("mp4", "-c:a", "ac3"), UnsupportedCodec, "unsupported_codec", "ac3"),
    "flac in ogg": (transcoded("oga", "-c:a", "flac"), UnsupportedCodec, "unsupported_codec", "FLAC"),
    "mp2": (transcoded("mp2", "-c:a", "mp2"), UnsupportedCodec, "unsupported_codec", "layer II"),
    "raw adts aac": (transcoded("aac", "-c:a", "aac"), UnsupportedCodec, "unsupported_codec", "ADTS"),
    "pcm in matroska": (transcoded("mka", "-c:a", "pcm_s16le"), UnsupportedCodec, "unsupported_codec",
                        "pcm_s16le"),
    "flac magic then garbage": (lambda tmp: b"fLaC" + np.random.default_rng(1).bytes(4000), CorruptAudio,
                                "corrupt_audio", "could not be decoded"),
    "mp4 box header then garbage": (lambda tmp: b"\0\0\0\x18ftypM4A \0\0\0\0M4A mp42" + bytes(100),
                                    CorruptAudio, "corrupt_audio", "could not be decoded"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files_are_a_clean_4xx(tmp_path, case):
    make, error_class, code, message_part = HOSTILE[case]
    content = make(tmp_path)
    upload = tmp_path / "incoming" / "upload"
    upload.parent.mkdir()
    upload.write_bytes(content)
    with pytest.raises(InvalidAudio) as refused:
        inspect_upload(upload, SETTINGS)
    assert type(refused.value) is error_class
    assert refused.value.code == code and 400 <= refused.value.http_status < 500
    assert message_part in refused.value.message
    assert upload.read_bytes() == content and sorted(p.name for p in upload.parent.iterdir()) == ["upload"]


def test_ffmpeg_is_handed_one_demuxer_and_no_protocol(tmp_path, monkeypatch):
    """Whatever a file holds, FFmpeg reads only the open upload, through the demuxer the magic
    bytes named: an MP4 whose data reference names another file does not read it."""
    opened = []
    import av

    real_open = av.open

    def spy(file, *args, **kwargs):
        opened.append((file, kwargs))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(av, "open", spy)
    upload = upload_copy(FORMATS["m4a aac-lc"].write(tmp_path, "song"), tmp_path)
    inspect_upload(upload, SETTINGS)
    (file, options), = opened
    assert not isinstance(file, (str, Path)) and file.name == str(upload)  # a file object: no URL
    assert options["format"] == "mov"
    assert options["options"] == decoders.FFMPEG_OPTIONS
    assert options["options"]["enable_drefs"] == "0" and options["options"]["protocol_whitelist"] == "none"



@pytest.mark.parametrize("case", ["flac 16-bit", "mp3 vbr with LAME header", "m4a aac-lc", "m4a alac 16-bit",
                                  "opus (opusenc)", "ogg vorbis (oggenc)", "webm opus", "mkv video with vorbis"])
def test_damaged_files_are_accepted_or_a_4xx_never_anything_else(tmp_path, case):
    """Bytes flipped, cut, overwritten with noise, in the header and in the stream: intake
    either takes what decodes or refuses with a 4xx; it never raises anything else."""
    original = FORMATS[case].write(tmp_path, "song").read_bytes()
    rng = np.random.default_rng(list(FORMATS).index(case))
    upload = tmp_path / "incoming" / "upload"
    upload.parent.mkdir()
    outcomes = set()
    for attempt in range(24):
        data = bytearray(original)
        region = min(len(data), 4096) if attempt % 2 else len(data)  # the header, or anywhere
        if attempt % 3 == 0:
            for _ in range(int(rng.integers(1, 40))):
                data[int(rng.integers(0, region))] = int(rng.integers(0, 256))
        elif attempt % 3 == 1:
            data = data[:int(rng.integers(16, len(data)))]
        else:
            start = int(rng.integers(0, region))
            data[start:start + 512] = rng.bytes(512)
        upload.write_bytes(bytes(data))
        try:
            inspect_upload(upload, SETTINGS)
            outcomes.add("accepted")
        except InvalidAudio as refused:
            assert 400 <= refused.http_status < 500, refused
            outcomes.add(refused.code)
    assert outcomes - {"accepted"}  # the damage was noticed at least once


def test_a_disk_that_fills_up_while_decoding_is_507_and_keeps_nothing(tmp_path):
    flac = FORMATS["flac 16-bit"].write(tmp_path, "song")  # ~0.2 MB that decodes to 0.5 MB
    with mounted_tmpfs(tmp_path / "small-disk", "400k", "no other test: this is intake's only disk-full "
                       "path") as disk:
        upload = disk / "upload"
        shutil.copyfile(flac, upload)
        with pytest.raises(InsufficientStorage) as refused:
            inspect_upload(upload, SETTINGS)
        assert refused.value.http_status == 507 and "disk filled up" in refused.value.message
        assert sorted(p.name for p in disk.iterdir()) == ["upload"]


def test_stray_bytes_between_an_id3_tag_and_the_first_frame_are_skipped(tmp_path):
    tagged = FORMATS["mp3 with ID3v1 and ID3v2"].write(tmp_path, "song").read_bytes()
    assert tagged.startswith(b"ID3")
    tag_end = 10 + sum((byte & 0x7F) << (7 * (3 - i)) for i, byte in enumerate(tagged[6:10]))
    with_junk = tmp_path / "junk.mp3"
    with_junk.write_bytes(tagged[:tag_end] + b"stray bytes a tagger left" + tagged[tag_end:])
    upload = upload_copy(with_junk, tmp_path)
    info = inspect_upload(upload, SETTINGS)
    assert info.input_format == "MP3/MPEG_LAYER_III"
    assert_matches_ffmpeg(upload, with_junk, lossless=False)


def test_the_ffmpeg_options_refuse_to_open_anything_but_the_upload(tmp_path):
    """Defence in depth behind the magic bytes: even a playlist demuxer, handed the upload
    with the options intake uses, cannot open the file the playlist names (without them,
    FFmpeg reads it)."""
    import av

    song = FORMATS["mp3 cbr (lame)"].write(tmp_path, "elsewhere")
    playlist = tmp_path / "list.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:5\n#EXTINF:5,\nfile://{song}\n#EXT-X-ENDLIST\n")

    def frames_read(options: dict) -> int:
        with open(playlist, "rb") as file, av.open(file, format="hls", options=dict(options)) as opened:
            return sum(frame.samples for frame in opened.decode(audio=0))

    assert frames_read({}) > 0  # the danger is real: FFmpeg follows the playlist by default
    with pytest.raises(av.FFmpegError):
        frames_read(decoders.FFMPEG_OPTIONS)
