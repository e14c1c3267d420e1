"""demix.grpc_api.server, the original gRPC interface: a real gRPC server over the real queue and worker, called
by a client generated from the proto by grpcio-tools in its own process, as an existing
client of the original service would be."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import subprocess
import sys
import textwrap
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf

from demix.cli.redis_server import free_port
from demix.grpc_api.protos import PROTO_FILE
from demix.grpc_api.server import DemixingServicer, grpc_status_for, job_fields, make_server
from demix.services import build_services
from demix.errors import DemixError
from demix.jobs.records import JobStatus
from testkit.synthetic_audio import write_wav
from testkit.tiny_models import TINY_MODEL
from tests.support.environment import UNCONSUMED_QUEUE
from tests.support.waiting import wait_for

ORIGINAL_PROTO = """\
syntax = "proto3";
service demixing { rpc demixing(Query) returns (Answer) {} }
message Query  { bytes audio_file = 1; string sounds = 2; }   // sounds: all | drums | bass | vocals | other
message Answer { string demixed_audio = 1; }
"""

CLIENT = textwrap.dedent("""
    import json, sys
    import grpc
    import demixing_pb2, demixing_pb2_grpc

    address, wav, sounds, timeout = sys.argv[1:5]
    metadata = [tuple(entry) for entry in json.loads(sys.argv[5])] or None
    limit = 1 << 30
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", limit),
                                                 ("grpc.max_send_message_length", limit)]) as channel:
        stub = demixing_pb2_grpc.demixingStub(channel)
        try:
            answer, call = stub.demixing.with_call(
                demixing_pb2.Query(audio_file=open(wav, "rb").read(), sounds=sounds), timeout=float(timeout),
                metadata=metadata)
            print(json.dumps({"demixed_audio": answer.demixed_audio,
                              "metadata": dict(call.initial_metadata())}))
        except grpc.RpcError as error:
            print(json.dumps({"code": error.code().name, "details": error.details(),
                              "metadata": dict(error.initial_metadata() or ()),
                              "trailing": dict(error.trailing_metadata() or ())}))
""")


@pytest.fixture(scope="session")
def grpc_client_dir(tmp_path_factory) -> Path:
    """Stubs generated from the proto by grpcio-tools' protoc, plus a small client script."""
    folder = tmp_path_factory.mktemp("grpc-client")
    (folder / "demixing.proto").write_text(PROTO_FILE.read_text())
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{folder}", f"--python_out={folder}",
                    f"--grpc_python_out={folder}", "demixing.proto"], check=True, cwd=folder)
    (folder / "client.py").write_text(CLIENT)
    return folder


def call(client_dir: Path, address: str, audio: Path, sounds: str, timeout: float = 300,
         api_key: tp.Optional[str] = None, model: tp.Optional[str] = None,
         metadata: tp.Sequence[tuple[str, str]] = ()) -> dict:
    """Run the generated client in its own process, with `metadata` and the entries `api_key`
    and `model` make; returns its answer or its error."""
    metadata = ([("authorization", f"Bearer {api_key}")] if api_key else []) + \
        ([("demix-model", model)] if model else []) + list(metadata)
    done = subprocess.run([sys.executable, str(client_dir / "client.py"), address, str(audio), sounds,
                           str(timeout), json.dumps(metadata)],
                          cwd=client_dir, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def grpc_address(celery_worker, settings) -> tp.Iterator[str]:
    server, port = make_server(settings, address="127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None).wait()


def decode_stems(answer: dict) -> dict[str, tuple[np.ndarray, int]]:
    stems = json.loads(answer["demixed_audio"])
    return {name: sf.read(io.BytesIO(base64.b64decode(data)), dtype="float64", always_2d=True)
            for name, data in stems.items()}


def test_the_committed_proto_is_the_original_services_unchanged():
    assert PROTO_FILE.read_text() == ORIGINAL_PROTO


def test_all_answers_four_complete_wavs_of_the_inputs_length(grpc_client_dir, grpc_address, live_server,
                                                             tmp_path):
    song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=1.5)
    answer = call(grpc_client_dir, grpc_address, song, "all")
    assert "code" not in answer, answer
    job = requests.get(f"{live_server.url}/v1/jobs/{answer['metadata']['demix-job-id']}", timeout=30).json()
    assert job["status"] == "succeeded" and job["stems"] == "all"  # an ordinary job, seen over HTTP too
    stems = decode_stems(answer)
    assert list(stems) == ["drums", "bass", "other", "vocals"]
    original, rate = sf.read(str(song), dtype="float64", always_2d=True)
    for samples, stem_rate in stems.values():
        assert stem_rate == rate and samples.shape == original.shape


def test_one_stem_answers_it_and_the_rest(grpc_client_dir, grpc_address, tmp_path):
    song = write_wav(tmp_path / "mono.wav", 22050, 1, seconds=0.7, seed=3)
    answer = call(grpc_client_dir, grpc_address, song, "vocals")
    stems = decode_stems(answer)
    assert list(stems) == ["vocals", "no_vocals"]
    original, rate = sf.read(str(song), dtype="float64", always_2d=True)
    (vocals, vocals_rate), (rest, _) = stems["vocals"], stems["no_vocals"]
    assert vocals_rate == rate and vocals.shape == rest.shape == original.shape
    assert np.abs(vocals + rest - original).max() <= 1 / 2 ** 15


def test_a_bad_wav_is_invalid_argument(grpc_client_dir, grpc_address, tmp_path):
    bogus = tmp_path / "song.wav"
    bogus.write_bytes(b"ID3\x04\x00" + bytes(200))
    answer = call(grpc_client_dir, grpc_address, bogus, "all")
    assert answer["code"] == "INVALID_ARGUMENT" and "MP3" in answer["details"]


def test_a_bad_sounds_value_is_invalid_argument(grpc_client_dir, grpc_address, tmp_path):
    song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=0.2)
    answer = call(grpc_client_dir, grpc_address, song, "guitar")
    assert answer["code"] == "INVALID_ARGUMENT"
    assert "guitar" in answer["details"] and "vocals" in answer["details"]


def test_a_10_kb_sounds_value_is_invalid_argument_with_a_short_message(grpc_client_dir, redis_server, settings,
                                                                       tmp_path):
    """Not echoed whole: the status travels in a trailer, and a client refuses one over its
    metadata limit (RESOURCE_EXHAUSTED instead of the real answer)."""
    idle = dataclasses.replace(settings, queue=UNCONSUMED_QUEUE)
    services = build_services(idle)
    server, port = make_server(idle, services=services, address="127.0.0.1:0")
    server.start()
    try:
        song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=0.2)
        answer = call(grpc_client_dir, f"127.0.0.1:{port}", song, "guitar" * 1700, timeout=30)  # 10200 characters
        assert answer["code"] == "INVALID_ARGUMENT", answer
        assert "sounds value" in answer["details"] and "(10200 characters)" in answer["details"], answer
        assert len(answer["details"]) < 300, answer
    finally:
        server.stop(grace=None).wait()
        services.jobs.redis.close()


def test_a_long_status_message_is_cut_to_a_bounded_length():
    from demix.grpc_api.server import MAX_DETAILS_CHARS, status_details

    assert status_details("short") == "short"
    cut = status_details("x" * 100_000)
    assert len(cut) == MAX_DETAILS_CHARS and cut.endswith("…")


def test_audio_over_the_upload_limit_is_resource_exhausted(grpc_client_dir, redis_server, settings, tmp_path):
    small = dataclasses.replace(settings, max_upload_mb=1)
    server, port = make_server(small, address="127.0.0.1:0")
    server.start()
    try:
        for seconds in (8.0, 20.0):  # over the limit; over the gRPC message limit too
            song = write_wav(tmp_path / f"long{seconds}.wav", 44100, 2, seconds=seconds)
            answer = call(grpc_client_dir, f"127.0.0.1:{port}", song, "all")
            assert answer["code"] == "RESOURCE_EXHAUSTED", answer
        assert "DEMIX_MAX_UPLOAD_MB" in call(grpc_client_dir, f"127.0.0.1:{port}",
                                             tmp_path / "long8.0.wav", "all")["details"]
    finally:
        server.stop(grace=None).wait()


@pytest.mark.processes
def test_redis_down_is_unavailable(grpc_client_dir, settings, tmp_path):
    down = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    services = build_services(down)
    server, port = make_server(down, services=services, address="127.0.0.1:0")
    server.start()
    try:
        song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=0.2)
        answer = call(grpc_client_dir, f"127.0.0.1:{port}", song, "all")
    finally:
        server.stop(grace=None).wait()
        services.jobs.redis.close()
    assert answer["code"] == "UNAVAILABLE" and "Redis" in answer["details"]
    assert not [p for p in (settings.data_dir / "incoming").glob("*") if p.is_file()]


def test_a_failed_job_is_internal_with_its_message(redis_server, settings):
    import grpc

    from demix.jobs.records import Job, new_job_id

    services = build_services(settings)
    try:
        job = Job(id=new_job_id(), status=JobStatus.FAILED, stems="all", model="m", samplerate=44100,
                  channels=2, frames=10, created_at=0.0,
                  error={"code": "model_unavailable", "message": "no weights for m"})
        with pytest.raises(DemixError) as error:
            DemixingServicer(services).answer(job)
    finally:
        services.jobs.redis.close()
    assert grpc_status_for(error.value) is grpc.StatusCode.INTERNAL
    assert "no weights for m" in error.value.message and error.value.code == "model_unavailable"


def test_a_call_past_its_deadline_cancels_its_job(grpc_client_dir, redis_server, settings, tmp_path):
    idle = dataclasses.replace(settings, queue=UNCONSUMED_QUEUE)  # no worker: the job stays queued
    services = build_services(idle)
    server, port = make_server(idle, services=services, address="127.0.0.1:0")
    server.start()
    try:
        song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=0.2)
        answer = call(grpc_client_dir, f"127.0.0.1:{port}", song, "all", timeout=3)
        assert answer["code"] == "DEADLINE_EXCEEDED"
        job_id = answer["metadata"]["demix-job-id"]
        wait_for(lambda: services.jobs.get(job_id).status is JobStatus.CANCELLED,
                 f"job {job_id} cancelled once its caller's deadline passed", timeout=60, every=0.1)
    finally:
        server.stop(grace=None).wait()
        services.jobs.redis.close()


def test_the_documented_python_example_works(grpc_client_dir, grpc_address, tmp_path):
    grpc_doc = (Path(__file__).resolve().parents[2] / "docs" / "grpc.md").read_text()
    example = next(b for b in grpc_doc.split("```python")[1:] if "demixingStub" in b).split("```")[0]
    write_wav(tmp_path / "song.wav", 44100, 2, seconds=0.5)
    (tmp_path / "example.py").write_text(example.replace("127.0.0.1:50051", grpc_address))
    subprocess.run([sys.executable, str(tmp_path / "example.py")], cwd=tmp_path, check=True, timeout=600,
                   env={"PYTHONPATH": str(grpc_client_dir), "PATH": ""})
    original, rate = sf.read(str(tmp_path / "song.wav"), always_2d=True)
    for name in ("vocals", "no_vocals"):
        samples, stem_rate = sf.read(str(tmp_path / f"{name}.wav"), always_2d=True)
        assert stem_rate == rate and samples.shape == original.shape


def test_demix_grpc_says_when_its_port_is_taken(grpc_address, settings):
    """Even by another gRPC server (which would otherwise share it through SO_REUSEPORT)."""
    host, port = grpc_address.rsplit(":", 1)
    busy = dataclasses.replace(settings, host=host, grpc_port=int(port))
    services = build_services(busy)
    try:
        with pytest.raises(OSError, match=f"{grpc_address}.*DEMIX_GRPC_PORT"):
            make_server(busy, services=services)
    finally:
        services.jobs.redis.close()


def test_with_api_keys_a_call_needs_one_and_its_job_is_the_keys(grpc_client_dir, redis_server, settings,
                                                                tmp_path):
    """The gRPC interface is no way around DEMIX_API_KEYS: the same keys, owners and limits."""
    from demix.api_keys import owner_id

    keyed = dataclasses.replace(settings, queue=UNCONSUMED_QUEUE, api_keys="grpc-key-1,grpc-key-2",
                                max_active_jobs_per_key=1)
    services = build_services(keyed)
    server, port = make_server(keyed, services=services, address="127.0.0.1:0")
    server.start()
    try:
        song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=0.2)
        for key in (None, "not-a-key"):
            answer = call(grpc_client_dir, f"127.0.0.1:{port}", song, "all", timeout=30, api_key=key)
            assert answer["code"] == "UNAUTHENTICATED" and "API key" in answer["details"], answer
        # No worker consumes this queue: the call waits until its deadline, then cancels its job.
        answer = call(grpc_client_dir, f"127.0.0.1:{port}", song, "all", timeout=3, api_key="grpc-key-1")
        assert answer["code"] == "DEADLINE_EXCEEDED", answer
        assert services.jobs.get(answer["metadata"]["demix-job-id"]).owner == owner_id("grpc-key-1")
    finally:
        server.stop(grace=None).wait()
        services.jobs.redis.close()


@pytest.mark.processes
def test_the_grpc_server_does_not_load_flask():
    """Both doors stand on `shared` as equals: the gRPC server never imports the HTTP API."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, demix.grpc_api.server; "
         "print(sorted({m.split('.')[0] for m in sys.modules} & {'flask', 'werkzeug', 'api', 'worker', 'torch'}))"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_a_demix_model_metadata_entry_chooses_the_model_and_its_queue(grpc_client_dir, redis_server, settings,
                                                                       tmp_path):
    """The proto has no model field: the `demix-model` metadata entry names one, else the default."""
    two = dataclasses.replace(settings, queue=UNCONSUMED_QUEUE, models=f"{settings.model},htdemucs_6s")
    services = build_services(two)
    server, port = make_server(two, services=services, address="127.0.0.1:0")
    server.start()
    try:
        song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=0.2)
        answer = call(grpc_client_dir, f"127.0.0.1:{port}", song, "all", timeout=30, model="htdemucs_ft")
        assert answer["code"] == "INVALID_ARGUMENT", answer
        assert answer["details"] == f"unknown model 'htdemucs_ft'; this service serves {settings.model}, htdemucs_6s"
        # The 6-stem model offers guitar; no worker consumes its queue, so the call waits out its deadline.
        answer = call(grpc_client_dir, f"127.0.0.1:{port}", song, "guitar", timeout=3, model="htdemucs_6s")
        assert answer["code"] == "DEADLINE_EXCEEDED", answer
        job = services.jobs.get(answer["metadata"]["demix-job-id"])
        assert (job.model, job.stems, job.queue) == ("htdemucs_6s", "guitar", f"{UNCONSUMED_QUEUE}.htdemucs_6s")
        answer = call(grpc_client_dir, f"127.0.0.1:{port}", song, "all", timeout=3)
        assert answer["code"] == "DEADLINE_EXCEEDED", answer
        job = services.jobs.get(answer["metadata"]["demix-job-id"])
        assert (job.model, job.queue) == (settings.model, UNCONSUMED_QUEUE)
    finally:
        server.stop(grace=None).wait()
        services.jobs.redis.close()


CHAIN = {"steps": [{"name": "voc", "input": "mix", "models": [TINY_MODEL]},
                   {"name": "band", "input": "voc/no_vocals", "models": [TINY_MODEL]}],
         "outputs": {"vocals": "voc/vocals", "instrumental": "voc/no_vocals", "drums": "band/drums",
                     "bass": "band/bass"}}
"""A two-step chain over the session worker's one model: vocals out, then the band from the rest."""


def test_without_a_workflow_a_call_asks_for_what_it_always_did():
    assert job_fields("", {}) == {"format": "wav", "model": "", "stems": "all"}
    assert job_fields(" Vocals ", {"demix-model": "m"}) == {"format": "wav", "model": "m", "stems": "vocals"}


def test_a_demix_workflow_metadata_entry_runs_the_workflow_and_answers_its_named_stems(
        grpc_client_dir, grpc_address, live_server, tmp_path):
    song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=0.6, seed=5)
    answer = call(grpc_client_dir, grpc_address, song, "", metadata=[("demix-workflow", json.dumps(CHAIN))])
    assert "code" not in answer, answer
    job = requests.get(f"{live_server.url}/v1/jobs/{answer['metadata']['demix-job-id']}", timeout=30).json()
    assert job["status"] == "succeeded" and list(job["outputs"]) == list(CHAIN["outputs"])  # seen over HTTP too
    stems = decode_stems(answer)
    assert list(stems) == ["vocals", "instrumental", "drums", "bass"]
    original, rate = sf.read(str(song), dtype="float64", always_2d=True)
    for samples, stem_rate in stems.values():
        assert stem_rate == rate and samples.shape == original.shape
    (vocals, _), (instrumental, _) = stems["vocals"], stems["instrumental"]
    assert np.abs(vocals + instrumental - original).max() <= 2 / 2 ** 15  # each stem rounded to 16 bits


def test_a_demix_preset_metadata_entry_runs_the_preset(grpc_client_dir, grpc_address, settings, tmp_path):
    """A preset from the server's presets file; `sounds` may say `all`, as old clients do."""
    from demix.workflows.presets import add_preset, remove_preset

    band = {"steps": [{"name": "band", "input": "mix", "models": [TINY_MODEL]}],
            "outputs": {"drums": "band/drums", "no_drums": "band/no_drums"}}
    add_preset(settings, "grpc_band", json.dumps(band))
    try:
        song = write_wav(tmp_path / "mono.wav", 22050, 1, seconds=0.5, seed=6)
        answer = call(grpc_client_dir, grpc_address, song, "all", metadata=[("demix-preset", "grpc_band")])
    finally:
        remove_preset(settings, "grpc_band")
    assert "code" not in answer, answer
    stems = decode_stems(answer)
    assert list(stems) == ["drums", "no_drums"]
    original, rate = sf.read(str(song), dtype="float64", always_2d=True)
    (drums, drums_rate), (rest, _) = stems["drums"], stems["no_drums"]
    assert drums_rate == rate and drums.shape == rest.shape == original.shape
    assert np.abs(drums + rest - original).max() <= 2 / 2 ** 15


@pytest.mark.parametrize("sounds, metadata, field, said", [
    ("", [("demix-workflow", json.dumps({"steps": [{"name": "a", "input": "mix", "models": ["nope"]}]}))],
     "workflow.steps[0].models[0]", "unknown model 'nope'"),
    ("", [("demix-workflow", json.dumps({**CHAIN, "outputs": {"vocals": "band/guitar"}}))],
     "workflow.outputs.vocals", "guitar"),
    ("", [("demix-workflow", "{not json")], "workflow", "not valid JSON"),
    ("", [("demix-preset", "no_such_preset")], "preset", "no preset is named 'no_such_preset'"),
    ("vocals", [("demix-workflow", json.dumps(CHAIN))], "sounds", "leave 'sounds' empty or 'all'"),
    ("", [("demix-workflow", json.dumps(CHAIN)), ("demix-model", TINY_MODEL)], "demix-model", "names its own models"),
    ("", [("demix-workflow", json.dumps(CHAIN)), ("demix-preset", "best_vocals")], "demix-workflow", "not both"),
])
def test_a_refused_workflow_is_invalid_argument_naming_the_field(grpc_client_dir, grpc_address, tmp_path,
                                                                sounds, metadata, field, said):
    song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=0.2)
    answer = call(grpc_client_dir, grpc_address, song, sounds, timeout=60, metadata=metadata)
    assert answer["code"] == "INVALID_ARGUMENT", answer
    assert answer["details"].startswith(f"{field}: ") and said in answer["details"], answer
    assert answer["trailing"]["demix-error-field"] == field, answer
    assert answer["trailing"]["demix-error-code"] in ("invalid_workflow", "unknown_preset"), answer


def test_a_workflow_as_long_as_the_service_takes_fits_in_the_metadata(grpc_client_dir, grpc_address, tmp_path):
    """gRPC's default limit on a call's metadata (8 KiB) would refuse it, saying nothing of why."""
    from demix.workflows.spec import MAX_WORKFLOW_CHARS

    compact = json.dumps(CHAIN)
    longest = compact[:-1] + " " * (MAX_WORKFLOW_CHARS - len(compact)) + "}"  # whitespace JSON allows
    song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=0.2)
    answer = call(grpc_client_dir, grpc_address, song, "", metadata=[("demix-workflow", longest)])
    assert list(json.loads(answer.get("demixed_audio", "{}"))) == list(CHAIN["outputs"]), answer
    answer = call(grpc_client_dir, grpc_address, song, "", metadata=[("demix-workflow", longest + " ")])
    assert answer["code"] == "INVALID_ARGUMENT", answer
    assert answer["details"] == f"workflow: {MAX_WORKFLOW_CHARS + 1} characters; at most {MAX_WORKFLOW_CHARS}"


def test_a_field_path_holding_the_callers_own_text_is_sent_as_a_bounded_ascii_trailer(grpc_client_dir,
                                                                                       grpc_address, tmp_path):
    """A stem name is the caller's: a newline in it, or 5000 characters, must not break the
    trailer (an invalid metadata value, or one over the client's 8 KiB limit; the workflow's
    check cuts a long key to 40 characters, the trailer escapes what is not ASCII)."""
    song = write_wav(tmp_path / "song.wav", 44100, 2, seconds=0.2)
    for name, field in (("Bad\nnamé", "workflow.outputs.Bad\\nnam\\xe9"),
                        ("x" * 5000, "workflow.outputs." + "x" * 40 + "\\u2026")):
        workflow = {**CHAIN, "outputs": {name: "voc/vocals"}}
        answer = call(grpc_client_dir, grpc_address, song, "", timeout=60,
                      metadata=[("demix-workflow", json.dumps(workflow))])
        assert answer["code"] == "INVALID_ARGUMENT" and answer["details"].startswith("workflow.outputs."), answer
        assert answer["trailing"]["demix-error-field"] == field, answer
