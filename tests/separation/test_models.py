"""Where models come from: an explicit repo, the local cache, the hub, npm."""
from __future__ import annotations

import logging

import pytest
import torch

from demix.cli.main import main
from demix.errors import ModelUnavailable
from testkit.tiny_models import make_tiny_htdemucs, write_tiny_repo
from demix.separation import models
from demix.separation.model_repo import list_repo, repo_has_model, save_bag
from demix.separation.models import ModelCache, ModelSpec, load_model, pull_model


def test_a_model_in_the_local_cache_loads_without_any_network(tmp_path, caplog):
    cache = write_tiny_repo(tmp_path / "models")
    with caplog.at_level(logging.INFO, logger="demix.separation.models"):
        model = load_model(ModelSpec("tiny", cache=str(cache)))
    assert model.sources == ["drums", "bass", "other", "vocals"] and not model.training
    assert "loaded from the local cache" in caplog.text


def test_an_explicit_repo_is_the_only_place_looked_in(tmp_path):
    cache = write_tiny_repo(tmp_path / "models")
    with pytest.raises(ModelUnavailable, match="DEMIX_MODEL_REPO=.*elsewhere"):
        load_model(ModelSpec("tiny", repo=str(tmp_path / "elsewhere"), cache=str(cache)))


def test_when_no_source_has_the_model_the_error_lists_each_and_how_to_provide_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelUnavailable) as caught:
        load_model(ModelSpec("htdemucs_6s", cache=str(tmp_path / "models")))
    message = caught.value.message
    assert "Hugging Face hub: unreachable" in message and "npm: only htdemucs" in message
    assert "demix models pull" in message and "DEMIX_MODEL_REPO" in message


def test_unknown_source_is_refused(tmp_path):
    with pytest.raises(ValueError, match="ftp"):
        pull_model("htdemucs", tmp_path, source="ftp")


def test_a_bag_saved_to_a_repo_loads_back_with_its_weights(tmp_path):
    from demucs.apply import BagOfModels
    from demucs.pretrained import get_model

    bag = BagOfModels([make_tiny_htdemucs(1), make_tiny_htdemucs(2)],
                      weights=[[1, 0, 0, 0], [0, 1, 1, 1]])
    save_bag(bag, tmp_path, "pair")
    assert repo_has_model(tmp_path, "pair") and not repo_has_model(tmp_path, "other")
    loaded = get_model("pair", repo=tmp_path)
    assert loaded.weights == [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]]
    for original, copy in zip(bag.models, loaded.models):
        for key, value in original.state_dict().items():
            assert torch.equal(copy.state_dict()[key], value)
    [entry] = list_repo(tmp_path)
    assert entry["name"] == "pair" and len(entry["models"]) == 2 and entry["bytes"] > 0


def test_the_cache_loads_each_model_once(tmp_path):
    loads = []
    cache = ModelCache(loader=lambda spec: loads.append(spec) or object())
    spec = ModelSpec("tiny", cache=str(tmp_path))
    assert cache.get(spec) is cache.get(spec)
    assert loads == [spec] and cache.loads == 1


def test_a_models_digest_changes_with_its_weights_and_is_computed_once(tmp_path, monkeypatch):
    model, same, other = make_tiny_htdemucs(), make_tiny_htdemucs(), make_tiny_htdemucs(seed=1)
    assert models.model_digest(model) == models.model_digest(same) != models.model_digest(other)
    with torch.no_grad():
        next(iter(same.parameters())).view(-1)[0] += 1e-6
    assert models.model_digest(same) != models.model_digest(model)
    computed = []
    cache = ModelCache(loader=lambda spec: model)
    original = models.model_digest
    monkeypatch.setattr(models, "model_digest", lambda loaded: computed.append(loaded) or original(loaded))
    spec = ModelSpec("tiny", cache=str(tmp_path))
    assert cache.digest(spec) == cache.digest(spec) == original(model)
    assert computed == [model]


@pytest.mark.slow  # `verify` runs the model over audio
def test_demix_models_list_and_verify(tmp_path, monkeypatch, capsys):
    write_tiny_repo(tmp_path / "data" / "models")
    monkeypatch.setenv("DEMIX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("DEMIX_MODEL_REPO")
    assert main(["models", "list"]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["models", "verify", "tiny"]) == 0
    assert "separates into drums, bass, other, vocals" in capsys.readouterr().out
    assert main(["models", "pull", "tiny", "--if-missing"]) == 0
    assert "already in" in capsys.readouterr().out
