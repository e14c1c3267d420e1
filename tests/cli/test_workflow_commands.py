"""`demix workflows`: adding (checked against the served models), listing and removing presets."""
from __future__ import annotations

from demix.cli.main import main
from demix.config import Settings
from demix.workflows.presets import all_presets

VOCALS_AND_BAND = "htdemucs,mel_band_roformer_kim,bs_roformer_viperx"


def test_a_broken_presets_file_leaves_the_shipped_presets_and_the_command_says_why(tmp_path, capsys, monkeypatch):
    settings = Settings(models=VOCALS_AND_BAND, data_dir=tmp_path / "data")
    settings.workflows_file.parent.mkdir(parents=True)
    settings.workflows_file.write_text("steps: [unclosed\n")
    assert [preset.name for preset in all_presets(settings)] == ["best_vocals", "vocals_then_band"]
    monkeypatch.setenv("DEMIX_MODELS", VOCALS_AND_BAND)
    monkeypatch.setenv("DEMIX_WORKFLOWS", str(settings.workflows_file))
    assert main(["workflows", "list"]) == 1
    assert "not valid YAML" in capsys.readouterr().err


def test_the_command_adds_lists_and_removes_presets(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DEMIX_MODELS", VOCALS_AND_BAND)
    monkeypatch.setenv("DEMIX_WORKFLOWS", str(tmp_path / "presets.yaml"))
    workflow = tmp_path / "karaoke.json"
    workflow.write_text('{"steps": [{"name": "voc", "models": ["bs_roformer_viperx"]}]}')
    assert main(["workflows", "add", "karaoke", str(workflow), "--description", "backing"]) == 0
    assert "preset karaoke saved in" in capsys.readouterr().out
    assert main(["workflows", "list"]) == 0
    listed = capsys.readouterr().out
    assert "best_vocals (shipped): htdemucs, mel_band_roformer_kim, bs_roformer_viperx; enabled" in listed
    assert f"karaoke ({tmp_path / 'presets.yaml'}): bs_roformer_viperx; enabled\n    backing" in listed
    workflow.write_text('{"steps": [{"name": "voc", "models": ["nope"]}]}')
    assert main(["workflows", "add", "broken", str(workflow)]) == 1
    assert "workflow.steps[0].models[0]: unknown model 'nope'" in capsys.readouterr().err
    assert main(["workflows", "remove", "karaoke"]) == 0
    assert main(["workflows", "remove", "karaoke"]) == 1
