"""`demix separate` against the live service."""
from __future__ import annotations

import numpy as np
import soundfile as sf

from cli.main import main
from shared.atomic import is_temporary
from tests.audio_factory import write_wav


def test_separate_uploads_a_batch_and_downloads_every_stem(live_server, tmp_path, capsys):
    first = write_wav(tmp_path / "first.wav", 44100, 2, seconds=1.0)
    second = write_wav(tmp_path / "second.wav", 16000, 1, seconds=0.5, seed=2)
    out = tmp_path / "stems"
    code = main(["separate", str(first), str(second), "--stems", "drums", "--server", live_server.url,
                 "-o", str(out)])
    assert code == 0
    assert "2 of 2 separated" in capsys.readouterr().out
    for path in (first, second):
        original, rate = sf.read(str(path), dtype="float64", always_2d=True)
        drums, drums_rate = sf.read(str(out / path.stem / "drums.wav"), dtype="float64", always_2d=True)
        rest, _ = sf.read(str(out / path.stem / "no_drums.wav"), dtype="float64", always_2d=True)
        assert drums_rate == rate and drums.shape == original.shape
        assert np.abs(drums + rest - original).max() <= 1 / 2 ** 15
    assert not [path for path in out.rglob("*") if is_temporary(path)]


def test_a_refused_file_is_reported_with_the_services_message(live_server, tmp_path, capsys):
    bogus = tmp_path / "song.wav"
    bogus.write_bytes(b"ID3\x04\x00" + bytes(200))
    assert main(["separate", str(bogus), "--server", live_server.url, "-o", str(tmp_path / "o")]) == 1
    assert "MP3" in capsys.readouterr().err
