"""The service's stems equal what `python -m demucs.separate` writes for the same model."""
from __future__ import annotations

import numpy as np
import pytest
import requests

from testkit.synthetic_audio import write_wav
from testkit.tiny_models import TINY_MODEL
from tests.support.live import wait_for_job
from tests.support.reference import demucs_separate
from tests.support.http_api import decode_result, submit

pytestmark = pytest.mark.processes

TOLERANCE = 1e-4  # max abs difference at fp32


@pytest.mark.parametrize("stems", ["all", "vocals"])
def test_stems_equal_demucs_separate_on_the_tiny_model(live_server, tiny_model_repo, tmp_path, stems):
    # Longer than one segment, with a short tail: seams and the padded last chunk count.
    path = write_wav(tmp_path / "mix.wav", 44100, 2, seconds=23.3, subtype="FLOAT", seed=5)
    expected = demucs_separate(path, tiny_model_repo, TINY_MODEL, tmp_path / "ref",
                               two_stems=None if stems == "all" else stems)
    job = wait_for_job(live_server.url, submit(live_server.url, path, stems).json()["id"])
    assert job["status"] == "succeeded", job["error"]
    got = decode_result(requests.get(job["result_url"], timeout=60).json())
    assert sorted(got) == sorted(expected)
    for name, reference in expected.items():
        assert got[name][0].shape == reference.shape
        assert np.abs(got[name][0] - reference).max() < TOLERANCE, name
