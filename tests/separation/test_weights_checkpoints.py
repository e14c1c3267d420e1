"""demix.separation.weights.checkpoints and `demix models add|pull` for RoFormer checkpoints: tiny real
RoFormers written at test time, downloaded by the real code from a local HTTP server that
honours (and can break off) ranged requests."""
from __future__ import annotations

import http.server
import json
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest

from demix.catalogue import Download, ModelInfo, describe_model, manifest_path
from demix.config import Settings
from tests.support.http_routes import serve
from testkit.tiny_models import TINY_DRUM_PARTS, write_tiny_roformer
from demix.separation.models import ModelSpec, load_model
from demix.separation.weights.checkpoints import CheckpointError, add_checkpoint, pull_checkpoint
from demix.separation.weights.download import sha256_file
from demix.separation.weights.pull_errors import ChecksumError, DownloadError


class RangeServer:
    """Files by path; honours `Range: bytes=N-`; the first `breaks` answers of a file stop
    after `break_after` bytes. Records each request's path and Range header."""

    def __init__(self, files: dict[str, bytes], break_after: int = 0, breaks: int = 0):
        self.files, self.break_after, self.breaks = files, break_after, breaks
        self.requests: list[tuple[str, tp.Optional[str]]] = []

    def handler(self) -> type:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append((self.path, self.headers.get("Range")))
                payload = server.files.get(self.path)
                if payload is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                if start >= len(payload):
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(payload) - start))
                self.end_headers()
                body = payload[start:]
                if server.breaks and len(body) > server.break_after:
                    server.breaks -= 1
                    self.wfile.write(body[:server.break_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: tp.Any) -> None:
                pass

        return Handler


@pytest.fixture
def tiny_drumsep(tmp_path) -> tuple[Path, Path]:
    return write_tiny_roformer(tmp_path / "given", "bs_roformer", TINY_DRUM_PARTS)


def test_add_checks_copies_and_records_a_checkpoint_the_worker_then_loads(tmp_path, tiny_drumsep):
    checkpoint, config = tiny_drumsep
    models = tmp_path / "models"
    info = add_checkpoint("drumsep", checkpoint, config, models, licence="CC BY 4.0 (say)")
    assert (info.architecture, info.sources, info.samplerate) == ("bs_roformer", tuple(TINY_DRUM_PARTS), 44100)
    assert info.sha256 == sha256_file(checkpoint) == sha256_file(models / "drumsep.ckpt")
    assert (models / "drumsep.config.yml").read_text() == config.read_text()
    assert ModelInfo.from_manifest(json.loads(manifest_path(models, "drumsep").read_text())) == info
    settings = Settings.from_env({}, data_dir=str(tmp_path), models="drumsep")
    described = describe_model(settings, "drumsep")
    assert described.stem_choices == ("all", "kick", "snare", "cymbals") and described.licence == "CC BY 4.0 (say)"
    model = load_model(ModelSpec("drumsep", "", "cpu", cache=str(models)))
    assert model.sources == tuple(TINY_DRUM_PARTS)


def test_the_worker_refuses_a_checkpoint_changed_after_it_was_added(tmp_path, tiny_drumsep):
    from demix.errors import ModelUnavailable

    models = tmp_path / "models"
    add_checkpoint("drumsep", *tiny_drumsep, models)
    other, _ = write_tiny_roformer(tmp_path / "other", "bs_roformer", TINY_DRUM_PARTS, seed=1)
    (models / "drumsep.ckpt").write_bytes(other.read_bytes())
    with pytest.raises(ModelUnavailable, match="drumsep.ckpt has sha256 .*, not the .* recorded when it was added"):
        load_model(ModelSpec("drumsep", "", "cpu", cache=str(models)))


def test_add_refuses_a_checkpoint_that_does_not_fit_its_config_and_keeps_nothing(tmp_path):
    checkpoint, _ = write_tiny_roformer(tmp_path / "a", "bs_roformer", TINY_DRUM_PARTS)
    _, vocals_config = write_tiny_roformer(tmp_path / "b", "mel_band_roformer", ["vocals", "other"], "vocals")
    with pytest.raises(CheckpointError, match="does not fit the config"):
        add_checkpoint("broken", checkpoint, vocals_config, tmp_path / "models")
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())


def test_pull_downloads_checks_and_adds_a_known_checkpoint(tmp_path):
    checkpoint, config = write_tiny_roformer(tmp_path / "published", "mel_band_roformer", ["vocals", "other"],
                                             "vocals")
    files = {"/kim.ckpt": checkpoint.read_bytes(), "/kim.yaml": config.read_bytes()}
    server = RangeServer(files)
    messages: list[str] = []
    progress: list[tuple[int, tp.Optional[int]]] = []
    with serve(server.handler()) as url:
        info = pull_checkpoint("mel_band_roformer_kim", tmp_path / "models", tmp_path / "downloads",
                               download=Download(f"{url}/kim.ckpt", f"{url}/kim.yaml", sha256_file(checkpoint)),
                               progress=lambda done, total: progress.append((done, total)), log=messages.append)
    assert (info.architecture, info.sources) == ("mel_band_roformer", ("vocals",))
    assert info.sha256 == sha256_file(checkpoint) and "matches the pinned value" in " ".join(messages)
    assert "No licence is stated" in info.licence and "No licence is stated" in messages[0]
    assert progress[-1] == (len(files["/kim.ckpt"]), len(files["/kim.ckpt"]))
    assert list((tmp_path / "downloads").iterdir()) == []  # nothing left but the cache's copy


def test_pull_resumes_a_download_broken_off_with_a_ranged_request(tmp_path):
    checkpoint, config = write_tiny_roformer(tmp_path / "published", "bs_roformer", ["vocals", "other"])
    payload = checkpoint.read_bytes()
    server = RangeServer({"/v.ckpt": payload, "/v.yaml": config.read_bytes()}, break_after=40_000, breaks=2)
    with serve(server.handler()) as url:
        info = pull_checkpoint("bs_roformer_viperx", tmp_path / "models", tmp_path / "downloads",
                               download=Download(f"{url}/v.ckpt", f"{url}/v.yaml"), log=lambda _: None)
    ranges = [header for path, header in server.requests if path == "/v.ckpt"]
    assert ranges == [None, "bytes=40000-", "bytes=80000-"]
    assert info.sha256 == sha256_file(checkpoint) == sha256_file(tmp_path / "models" / "bs_roformer_viperx.ckpt")


def test_a_pull_cut_off_every_time_keeps_its_part_and_the_next_pull_finishes_it(tmp_path):
    checkpoint, config = write_tiny_roformer(tmp_path / "published", "bs_roformer", ["vocals", "other"])
    payload = checkpoint.read_bytes()
    server = RangeServer({"/v.ckpt": payload, "/v.yaml": config.read_bytes()}, break_after=20_000, breaks=5)
    source = None
    with serve(server.handler()) as url:
        source = Download(f"{url}/v.ckpt", f"{url}/v.yaml")
        with pytest.raises(DownloadError, match="run the command again to resume from 100000 bytes"):
            pull_checkpoint("bs_roformer_viperx", tmp_path / "models", tmp_path / "downloads", download=source,
                            log=lambda _: None)
        partial = tmp_path / "downloads" / "bs_roformer_viperx.ckpt.part"
        assert partial.read_bytes() == payload[:100_000]
        info = pull_checkpoint("bs_roformer_viperx", tmp_path / "models", tmp_path / "downloads", download=source,
                               log=lambda _: None)
    assert server.requests[-1] == ("/v.ckpt", "bytes=100000-")
    assert info.sha256 == sha256_file(checkpoint) and not partial.exists()


def test_a_checksum_mismatch_deletes_the_download_and_adds_nothing(tmp_path):
    checkpoint, config = write_tiny_roformer(tmp_path / "published", "bs_roformer", ["vocals", "other"])
    server = RangeServer({"/v.ckpt": checkpoint.read_bytes(), "/v.yaml": config.read_bytes()})
    with serve(server.handler()) as url:
        with pytest.raises(ChecksumError, match="expected 0{64}"):
            pull_checkpoint("bs_roformer_viperx", tmp_path / "models", tmp_path / "downloads",
                            download=Download(f"{url}/v.ckpt", f"{url}/v.yaml", "0" * 64), log=lambda _: None)
    assert not (tmp_path / "models" / "bs_roformer_viperx.ckpt").exists()
    assert not (tmp_path / "downloads" / "bs_roformer_viperx.ckpt.part").exists()


def test_pull_of_an_unknown_name_says_what_it_knows():
    with pytest.raises(CheckpointError, match="bs_roformer_viperx, mel_band_roformer_kim"):
        pull_checkpoint("no_such_model", Path("/nonexistent"), Path("/nonexistent"))


def run_cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "DEMIX_DATA_DIR": str(data_dir)}
    env.pop("DEMIX_MODEL_REPO", None)
    return subprocess.run([sys.executable, "-m", "demix.cli.main", "models", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.processes
def test_demix_models_add_pull_and_list(tmp_path, tiny_drumsep):
    checkpoint, config = tiny_drumsep
    data = tmp_path / "data"
    added = run_cli("add", "drumsep", "--checkpoint", str(checkpoint), "--config", str(config),
                    "--licence", "the author's own terms", data_dir=data)
    assert added.returncode == 0, added.stderr
    assert "drumsep: bs_roformer, sources kick, snare, cymbals, 44100 Hz" in added.stdout
    published, published_config = write_tiny_roformer(tmp_path / "published", "mel_band_roformer",
                                                       ["vocals", "other"], "vocals")
    server = RangeServer({"/k.ckpt": published.read_bytes(), "/k.yaml": published_config.read_bytes()})
    with serve(server.handler()) as url:
        pulled = run_cli("pull", "mel_band_roformer_kim", "--url", f"{url}/k.ckpt", "--config-url",
                         f"{url}/k.yaml", "--sha256", sha256_file(published), data_dir=data)
        assert pulled.returncode == 0, pulled.stderr
        assert "mel_band_roformer_kim (mel_band_roformer: vocals) is ready" in pulled.stdout
        again = run_cli("pull", "mel_band_roformer_kim", "--if-missing", data_dir=data)
        assert "already in" in again.stdout and len(server.requests) == 2
    verified = run_cli("verify", "drumsep", data_dir=data)
    assert verified.returncode == 0, verified.stderr
    assert "separates into kick, snare, cymbals" in verified.stdout
    listed = run_cli("list", data_dir=data)
    assert "drumsep" in listed.stdout and "the author's own terms" in listed.stdout
    assert f"sha256 {sha256_file(published)}" in listed.stdout and "No licence is stated" in listed.stdout
    refused = run_cli("add", "broken", "--checkpoint", str(checkpoint), "--config", str(published_config),
                      data_dir=data)
    assert refused.returncode == 1 and "does not fit the config" in refused.stderr
