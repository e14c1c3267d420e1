"""demix.catalogue and the settings it reads: served models, their queues, what is known
of each and who serves it (plain data: no Redis, no torch)."""
from __future__ import annotations

import pytest

from demix.catalogue import (KNOWN_MODELS, NO_LICENCE_STATED, ModelInfo, catalogue, check_model, describe_model,
                             write_manifest)
from demix.config import Settings
from demix.errors import BadRequest


def settings(tmp_path, **values: str) -> Settings:
    return Settings.from_env({}, data_dir=str(tmp_path), **values)


def test_without_demix_models_the_one_model_keeps_the_one_queue(tmp_path):
    plain = settings(tmp_path)
    assert plain.served_models == ("htdemucs",) and plain.default_model == "htdemucs"
    assert plain.queue_for("htdemucs") == "demix" and plain.worker_served_models == ("htdemucs",)
    assert settings(tmp_path, model="htdemucs_ft").served_models == ("htdemucs_ft",)


def test_the_first_served_model_is_the_default_and_keeps_demix_queue(tmp_path):
    served = settings(tmp_path, models=" htdemucs_6s, htdemucs ,htdemucs_6s,", queue="q")
    assert served.served_models == ("htdemucs_6s", "htdemucs")  # blanks and repeats dropped
    assert [served.queue_for(name) for name in served.served_models] == ["q", "q.htdemucs"]
    assert settings(tmp_path, models="a,b", worker_models="b").worker_served_models == ("b",)


def test_check_model_lists_the_served_ones(tmp_path):
    served = settings(tmp_path, models="htdemucs,htdemucs_6s")
    assert check_model(served, "htdemucs_6s") == "htdemucs_6s"
    with pytest.raises(BadRequest, match="unknown model 'HTDemucs'; this service serves htdemucs, htdemucs_6s"):
        check_model(served, "HTDemucs")


def test_a_manifest_wins_over_the_built_in_list_and_a_warm_worker_over_both(tmp_path):
    served = settings(tmp_path, models="mel_band_roformer_kim")
    built_in = describe_model(served, "mel_band_roformer_kim")
    assert built_in == KNOWN_MODELS["mel_band_roformer_kim"] and built_in.licence == NO_LICENCE_STATED
    pulled = ModelInfo("mel_band_roformer_kim", "mel_band_roformer", ("vocals",), 44100, "pulled", "none stated",
                       checkpoint="k.ckpt", config="k.config.yml", sha256="ab" * 32)
    write_manifest(served.models_dir, pulled)
    assert describe_model(served, "mel_band_roformer_kim") == pulled
    loaded = describe_model(served, "mel_band_roformer_kim", {"architecture": "mel_band_roformer",
                                                              "sources": ["vocals", "other"], "samplerate": 48000})
    assert (loaded.sources, loaded.samplerate, loaded.sha256) == (("vocals", "other"), 48000, "ab" * 32)


def test_an_unlisted_model_is_a_demucs_bag_when_a_folder_holds_one_else_unknown(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "mine.yaml").write_text("models: [mine0]\n")
    with_repo = settings(tmp_path, model_repo=str(repo))
    mine = describe_model(with_repo, "mine")
    assert (mine.architecture, mine.sources) == ("demucs", ())
    assert mine.stem_choices == ("all", "drums", "bass", "other", "vocals")  # until a worker loads it
    assert describe_model(with_repo, "other").architecture == "unknown"


def test_the_catalogue_counts_warm_workers_per_model_and_skips_failed_loads(tmp_path):
    served = settings(tmp_path, models="htdemucs,htdemucs_6s,mel_band_roformer_kim")
    ready = {
        "a:1": {"ready_at": 1, "model": "htdemucs", "models": {
            "htdemucs": {"architecture": "demucs", "sources": ["drums", "bass", "other", "vocals"],
                         "samplerate": 44100},
            "mel_band_roformer_kim": {"error": "not in the model folders"}}},
        "b:2": {"ready_at": 1, "model": "htdemucs"},  # an entry from before models were chosen per job
    }
    entries = {entry["name"]: entry for entry in catalogue(served, ready)}
    assert [(e["workers"], e["available"]) for e in entries.values()] == [(2, True), (0, False), (0, False)]
    assert entries["htdemucs_6s"]["stems"][-2:] == ["guitar", "piano"]
    assert entries["htdemucs"]["default"] and not entries["htdemucs_6s"]["default"]
    assert entries["mel_band_roformer_kim"]["queue"] == "demix.mel_band_roformer_kim"
