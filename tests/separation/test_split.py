"""Split jobs, engine side: a job cut into parts along the segment grid, each part run
on its own, then merged, gives the stems of the unsplit run (the tiny real HT-Demucs,
with a 1 s segment so that parts of a few segments run in seconds)."""
from __future__ import annotations

import typing as tp
from pathlib import Path

import pytest
from demucs.apply import BagOfModels

from demix.audio.io import read_info
from demix.audio.output_formats import resolve_output
from demix.storage.local import FolderSplitFiles
from testkit.synthetic_audio import write_wav
from testkit.tiny_models import make_tiny_htdemucs
from testkit.memory_sink import MemorySink
from tests.support.memory_sink import max_difference, unsplit_run
from demix.separation.engine import SeparationOptions, stem_layout
from demix.separation.split import merge_split, plan_parts, prepare_split, run_part, single_pass, stream_windows

# Each runs a separation model over audio (seconds each): outside the fast set.
pytestmark = pytest.mark.slow

SEGMENT = 44100  # the test model's segment: 1 s at 44.1 kHz
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model() -> BagOfModels:
    return BagOfModels([make_tiny_htdemucs()], segment=SEGMENT / 44100)


def split_run(model: BagOfModels, path: Path, stems: str, part_seconds: float, folder: Path,
              form: tp.Optional[dict] = None, part_order: tp.Optional[list[int]] = None) -> MemorySink:
    """Prepare, run every part (in `part_order`), merge: as the service's tasks do."""
    output = resolve_output(form or {"sample_format": "float32"}, read_info(path))
    layout = stem_layout(model, path, stems, output)
    folder.mkdir()  # as `JobStorage.begin_split` does
    files = FolderSplitFiles(folder)
    plan = prepare_split(model, path, layout, 0.25, int(part_seconds * model.samplerate), files)
    for index in part_order or range(len(plan.parts)):
        run_part(model, layout, plan, index, files, SeparationOptions())
    sink = MemorySink()
    merge_split(model, path, layout, plan, files, sink)
    sink.plan = plan
    return sink


@pytest.mark.parametrize("seconds, part_seconds, parts", [
    (6.3, 3.0, 3), (6.3, 1.6, 4), (9.77, 2.5, 4), (5.0, 0.5, 7)],
    ids=["3-parts", "4-parts", "odd-length", "a-window-per-part"])
def test_split_stems_equal_the_unsplit_stems(model, tmp_path, seconds, part_seconds, parts):
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds, subtype="FLOAT")
    split = split_run(model, path, "all", part_seconds, tmp_path / "split")
    assert len(split.plan.parts) == parts
    assert max_difference(split, unsplit_run(model, path, "all")) < TOLERANCE


def test_every_part_boundary_lies_inside_a_cross_fade(model):
    parts = plan_parts(model.models[0], int(9.77 * 44100), 0.25, int(2.5 * 44100))
    windows = list(stream_windows(model.models[0], int(9.77 * 44100), 0.25))
    assert parts[0].start == 0 and parts[-1].stop == int(9.77 * 44100)
    assert [p.first_window for p in parts[1:]] == [p.stop_window for p in parts[:-1]]
    assert parts[-1].stop_window == len(windows)
    for before, after in zip(parts, parts[1:]):
        assert after.start < before.stop  # two windows, one of each part, fade across it
        assert after.read_start < before.stop


@pytest.mark.parametrize("stems", ["vocals", "drums"])
def test_one_stem_and_its_rest_at_48_khz_mono_in_any_part_order(model, tmp_path, stems):
    path = write_wav(tmp_path / "in.wav", 48000, 1, 7.1, subtype="PCM_24")
    form = {"sample_format": "float32"}
    split = split_run(model, path, stems, 2.0, tmp_path / "split", form, part_order=[2, 0, 3, 1])
    assert len(split.plan.parts) == 4
    reference = unsplit_run(model, path, stems, form)
    assert list(split.formats) == [stems, f"no_{stems}"]
    assert split.formats[stems] == (48000, 1, "FLOAT", int(48000 * 7.1))
    assert max_difference(split, reference) < TOLERANCE


def test_pcm16_stems_at_another_rate_and_a_stereo_downmix_are_identical(model, tmp_path):
    path = write_wav(tmp_path / "in.wav", 22050, 6, 5.3)
    form = {"samplerate": "32000", "channels": "stereo"}
    split = split_run(model, path, "all", 1.5, tmp_path / "split", form)
    reference = unsplit_run(model, path, "all", form)
    assert split.formats["vocals"][:3] == (32000, 2, "PCM_16")
    assert max_difference(split, reference) <= 1 / 32768  # at most one step of the grid


def test_shifts_and_bags_of_several_models_run_unsplit(model):
    assert single_pass(model, ["vocals"]) is not None
    assert single_pass(model, ["vocals"], shifts=1) is None
    bag = BagOfModels([make_tiny_htdemucs(0), make_tiny_htdemucs(1)], segment=1.0)
    assert single_pass(bag, ["vocals"]) is None
    pruned = BagOfModels([make_tiny_htdemucs(0), make_tiny_htdemucs(1)], segment=1.0,
                         weights=[[1, 1, 1, 0], [0, 0, 0, 1]])
    chosen = single_pass(pruned, ["vocals"])
    assert chosen is not None and chosen.model is pruned.models[1]
