"""The supervisor of `demix up` on real child processes: restarts with backoff, says
what died and why, gives up on a part that cannot start, stops in order.

The service's own parts are exercised under `demix up` in `test_cli_up.py` and
`test_chaos.py`; here small Python children stand in for them so every rule of the
restart policy can be shown in seconds."""
from __future__ import annotations

import dataclasses
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import typing as tp

import pytest

from demix.cli.argv import flower_argv
from demix.cli.processes import popen_child
from demix.cli.redis_server import RedisServer, free_port
from demix.cli.supervisor import Part, RestartPolicy, Service, ServiceFailed, Supervisor, describe_exit
from demix.config import Settings
from demix.host_processes import process_is_gone
from tests.support.service_state import database_url
from tests.support.waiting import wait_for

pytestmark = pytest.mark.processes

FAST = RestartPolicy(initial_delay_s=0.05, max_delay_s=0.4, healthy_after_s=1.0, max_failed_starts=3)

SERVE_FOREVER = """
import signal, sys, time
def stop(*_):
    if len(sys.argv) > 1:
        with open(sys.argv[1], "a") as log:
            log.write(sys.argv[2] + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("serving", flush=True)
while True:
    time.sleep(0.1)
"""


def child(script: str, *args: str) -> tp.Callable[[], subprocess.Popen]:
    return lambda: popen_child([sys.executable, "-c", script, *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def answers(process: subprocess.Popen) -> bool:
    return process.poll() is None


def tick_until(supervisor: Supervisor, condition: tp.Callable[[], bool], timeout: float = 60) -> None:
    """Tick the supervisor until `condition` holds."""
    def ticked() -> bool:
        if condition():
            return True
        supervisor.tick()
        return False

    wait_for(ticked, "the supervisor reaching the condition", timeout=timeout, every=0.02)


def pid_of(supervisor: Supervisor, name: str) -> tp.Optional[int]:
    process = supervisor.states[name].process
    return process.pid if process is not None else None


@pytest.fixture
def out() -> io.StringIO:
    return io.StringIO()


def test_restart_delays_double_up_to_the_cap():
    policy = RestartPolicy(initial_delay_s=1, max_delay_s=30)
    assert [policy.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_exits_are_described_by_code_or_signal_name():
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert describe_exit(3) == "exited with code 3"


def test_a_killed_part_is_restarted_and_the_log_says_what_died_and_why(out):
    supervisor = Supervisor([Part("server", spawn=child(SERVE_FOREVER), is_ready=answers)], FAST, out=out)
    try:
        # The part's own "serving" line can come before the supervisor's readiness probe has seen it answer;
        # a kill in between would (rightly) be logged as a failed start, so wait for the probe. And wait
        # for its line to be relayed: a loaded machine may take longer to start Python than to kill it.
        tick_until(supervisor, lambda: supervisor.is_answering("server") and "server | serving" in out.getvalue())
        first = pid_of(supervisor, "server")
        os.kill(first, signal.SIGKILL)
        tick_until(supervisor, lambda: supervisor.is_answering("server") and pid_of(supervisor, "server") != first)
    finally:
        supervisor.stop()
    log = out.getvalue()
    assert re.search(rf"server \(pid {first}\) died: killed by SIGKILL, after [\d.]+s up; restarting it in 0.05s", log), log
    assert "restarted server" in log and "server is back" in log
    assert "server | serving" in log  # the part's own output, prefixed with its name


def test_backoff_doubles_while_a_part_keeps_dying_and_resets_after_it_stays_up(out):
    supervisor = Supervisor([Part("server", spawn=child(SERVE_FOREVER), is_ready=answers)], FAST, out=out)

    def kill_and_wait_for_restart() -> str:
        pid = pid_of(supervisor, "server")
        os.kill(pid, signal.SIGKILL)
        tick_until(supervisor, lambda: supervisor.is_answering("server") and pid_of(supervisor, "server") != pid)
        return re.findall(r"restarting it in ([\d.]+)s", out.getvalue())[-1]

    try:
        tick_until(supervisor, lambda: supervisor.is_answering("server"))
        delays = [kill_and_wait_for_restart() for _ in range(5)]
        assert delays == ["0.05", "0.1", "0.2", "0.4", "0.4"]
        up_since = time.monotonic()
        tick_until(supervisor, lambda: time.monotonic() - up_since > FAST.healthy_after_s + 0.5)
        assert kill_and_wait_for_restart() == "0.05"
    finally:
        supervisor.stop()


def test_an_essential_part_that_keeps_dying_at_start_stops_the_service_saying_why(out):
    crashing = "import sys; print('DEMIX_SOMETHING=oops is not valid', flush=True); sys.exit(3)"
    supervisor = Supervisor([Part("server", spawn=child(SERVE_FOREVER), is_ready=answers),
                             Part("broken", spawn=child(crashing), is_ready=lambda _p: False,
                                  hint="Check DEMIX_SOMETHING.")], FAST, out=out)
    try:
        with pytest.raises(ServiceFailed) as failure:
            supervisor.run(threading.Event(), on_ready=lambda: None, ready_timeout_s=120)
    finally:
        supervisor.stop()
    message = str(failure.value)
    assert "broken (pid" in message and "died: exited with code 3" in message
    assert "before it answered (3 times in a row); it is not restarted again" in message
    assert "Check DEMIX_SOMETHING." in message
    assert "DEMIX_SOMETHING=oops is not valid" in message  # its last output
    assert out.getvalue().count("restarting it in") == 2


def test_an_optional_part_that_keeps_dying_at_start_is_left_out_and_the_rest_carries_on(out):
    ready = threading.Event()
    stop = threading.Event()
    supervisor = Supervisor([Part("server", spawn=child(SERVE_FOREVER), is_ready=answers),
                             Part("extra", spawn=child("import sys; sys.exit(1)"), is_ready=lambda _p: False,
                                  essential=False)], FAST, out=out)
    runner = threading.Thread(target=supervisor.run, args=(stop,), kwargs={"on_ready": ready.set})
    runner.start()
    try:
        assert ready.wait(60), out.getvalue()
        assert supervisor.is_answering("server")
        assert "warning: extra (pid" in out.getvalue()
        assert "The rest of the service carries on without extra." in out.getvalue()
    finally:
        stop.set()
        runner.join(30)
        supervisor.stop()


def test_an_essential_part_that_never_answers_is_restarted_then_given_up_saying_why(out):
    silent = Part("silent", spawn=child(SERVE_FOREVER), is_ready=lambda _p: False, answer_timeout_s=1.0)
    supervisor = Supervisor([Part("server", spawn=child(SERVE_FOREVER), is_ready=answers), silent], FAST, out=out)
    pids = []
    try:
        with pytest.raises(ServiceFailed, match=r"silent \(pid \d+\) did not answer within 1s of its start, "
                                                r".* \(3 times in a row\); it is not restarted again"):
            def tick_and_note() -> None:
                pid = pid_of(supervisor, "silent")
                if pid is not None and pid not in pids:
                    pids.append(pid)
            supervisor.run(threading.Event(), on_ready=tick_and_note, ready_timeout_s=600)
    finally:
        supervisor.stop()
    log = out.getvalue()
    assert log.count("did not answer within 1s of its start; stopping it") == 3
    assert log.count("restarting it in") == 2
    said = re.findall(r"silent \(pid (\d+)\) did not answer", log)
    assert len(set(said)) == 3  # three processes, each stopped
    assert all(process_is_gone(int(pid)) for pid in said)


def test_an_optional_part_that_never_answers_is_left_out_of_the_ready_message(out):
    silent = Part("silent", spawn=child(SERVE_FOREVER), is_ready=lambda _p: False, essential=False)
    ready, stop = threading.Event(), threading.Event()
    supervisor = Supervisor([Part("server", spawn=child(SERVE_FOREVER), is_ready=answers), silent], FAST, out=out)
    runner = threading.Thread(target=supervisor.run, args=(stop,),
                              kwargs={"on_ready": ready.set, "ready_timeout_s": 2})
    runner.start()
    try:
        assert ready.wait(60)
        assert "warning: silent did not answer within 2s; the service is ready without it" in out.getvalue()
        assert supervisor.states["silent"].process.poll() is None  # still supervised
    finally:
        stop.set()
        runner.join(30)
        supervisor.stop()


def test_a_part_that_stops_answering_is_restarted_but_not_while_what_it_needs_is_down(out):
    answering = {"needed": True, "server": True}
    needed = Part("needed", spawn=child(SERVE_FOREVER), is_ready=lambda _p: answering["needed"])
    server = Part("server", spawn=child(SERVE_FOREVER), is_ready=answers, requires=("needed",),
                  is_alive=lambda _p: answering["server"], unanswered_restart_s=0.5)
    supervisor = Supervisor([needed, server], FAST, out=out)
    try:
        tick_until(supervisor, lambda: supervisor.is_answering("server"))
        first = pid_of(supervisor, "server")
        answering.update(needed=False, server=False)  # it cannot answer while `needed` is down
        os.kill(pid_of(supervisor, "needed"), signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            supervisor.tick()
            time.sleep(0.02)
        assert pid_of(supervisor, "server") == first
        answering["needed"] = True
        tick_until(supervisor, lambda: pid_of(supervisor, "server") not in (first, None))
        assert re.search(rf"server \(pid {first}\) has not answered for \d+s; stopping it", out.getvalue())
        answering["server"] = True
        tick_until(supervisor, lambda: supervisor.is_answering("server"))
    finally:
        supervisor.stop()


def test_a_part_starts_only_once_the_parts_it_requires_answer(out, tmp_path):
    flag = tmp_path / "base-answers"
    supervisor = Supervisor([
        Part("base", spawn=child(SERVE_FOREVER), is_ready=lambda _p: flag.exists()),
        Part("dependent", spawn=child(SERVE_FOREVER), is_ready=answers, requires=("base",)),
    ], FAST, out=out)
    try:
        tick_until(supervisor, lambda: pid_of(supervisor, "base") is not None)
        for _ in range(10):
            supervisor.tick()
        assert pid_of(supervisor, "dependent") is None
        flag.touch()
        tick_until(supervisor, lambda: supervisor.is_answering("dependent"))
    finally:
        supervisor.stop()


def test_stop_ends_the_parts_in_reverse_order_and_none_is_restarted(out, tmp_path):
    log = tmp_path / "stopped.txt"
    names = ["redis", "worker", "flower", "api"]
    supervisor = Supervisor([Part(name, spawn=child(SERVE_FOREVER, str(log), name), is_ready=answers)
                             for name in names], FAST, out=out)
    tick_until(supervisor, lambda: all(f"{name} | serving" in out.getvalue() for name in names))
    processes = [supervisor.states[name].process for name in names]
    supervisor.stop()
    assert log.read_text().split() == names[::-1]
    assert all(process.poll() is not None for process in processes)
    supervisor.tick()
    assert all(state.process is None for state in supervisor.states.values())


def test_watches_run_once_every_part_answers_and_their_warnings_are_said(out):
    calls = []

    def stalled() -> str:
        calls.append(time.monotonic())
        return "3 webhook(s) overdue"

    supervisor = Supervisor([Part("server", spawn=child(SERVE_FOREVER), is_ready=answers)], FAST, out=out,
                            watches=[stalled, lambda: None])
    try:
        supervisor.tick()  # started, not answering yet: no watch
        assert calls == []
        tick_until(supervisor, lambda: "warning: 3 webhook(s) overdue" in out.getvalue())
        for _ in range(5):
            supervisor.tick()
    finally:
        supervisor.stop()
    assert len(calls) == 1  # once a minute, not on every tick
    assert out.getvalue().count("warning:") == 1


def test_the_service_warns_when_webhooks_are_overdue_and_no_sender_is_alive(redis_server):
    import redis

    from demix import redis_keys as keys
    from demix.jobs.webhook_health import OVERDUE_S, beat

    url = database_url(redis_server, 6)  # the session's worker sends webhooks on database 0
    service = Service(Settings.from_env({}, redis_url=url))
    with redis.Redis.from_url(url) as client:
        client.flushdb()
        try:
            assert service.watches() == [service.webhooks_stalled]
            assert service.webhooks_stalled() is None
            client.zadd(keys.webhooks_due_key(), {"late": time.time() - OVERDUE_S - 1, "due": time.time()})
            warning = service.webhooks_stalled()
            assert warning is not None and warning.startswith(
                "1 webhook(s) overdue (2 pending) and no webhook sender is alive"), warning
            beat(client, "host:1:x")
            assert service.webhooks_stalled() is None
        finally:
            client.flushdb()
    unreachable = Service(Settings.from_env({}, redis_url="redis://127.0.0.1:1/0"))
    assert unreachable.webhooks_stalled() is None  # Redis down: the parts' checks say so


def test_the_service_runs_flower_unless_its_port_is_0():
    settings = Settings.from_env({}, redis_url="redis://127.0.0.1:1/0", model_repo="/models")
    assert [part.name for part in Service(settings).parts()] == ["worker", "Flower", "gRPC", "API"]
    without = Settings.from_env({"DEMIX_FLOWER_PORT": "0"}, redis_url="redis://127.0.0.1:1/0")
    assert [part.name for part in Service(without).parts()] == ["worker", "gRPC", "API"]
    assert "Flower" not in Service(without).ready_message()


def test_the_service_runs_grpc_unless_its_port_is_0():
    settings = Settings.from_env({"DEMIX_GRPC_PORT": "0"}, redis_url="redis://127.0.0.1:1/0")
    assert [part.name for part in Service(settings).parts()] == ["worker", "Flower", "API"]
    assert "gRPC" not in Service(settings).ready_message()


def test_the_service_runs_without_grpc_when_its_port_is_taken(tmp_path):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        settings = Settings.from_env({"DEMIX_GRPC_PORT": str(taken), "DEMIX_PORT": str(free_port()),
                                      "DEMIX_FLOWER_PORT": "0"},
                                     redis_url="redis://127.0.0.1:1/0", model_repo="/models")
        service, said = Service(settings), []
        service.prepare(said.append)
    assert [part.name for part in service.parts()] == ["worker", "API"]
    assert any(f"127.0.0.1:{taken} is already in use (DEMIX_GRPC_PORT)" in line for line in said), said
    assert "gRPC" not in service.ready_message()


def test_with_api_keys_and_no_flower_login_demix_up_says_flower_keeps_to_loopback():
    # DEMIX_HOST 127.0.0.2 stands for a public address: another loopback one.
    settings = Settings.from_env({"DEMIX_HOST": "127.0.0.2", "DEMIX_PORT": str(free_port()),
                                  "DEMIX_FLOWER_PORT": str(free_port()), "DEMIX_GRPC_PORT": "0",
                                  "DEMIX_API_KEYS": "k1"}, redis_url="redis://127.0.0.1:1/0", model_repo="/models")
    service, said = Service(settings), []
    service.prepare(said.append)
    assert any("Flower listens on 127.0.0.1 only" in line and "DEMIX_FLOWER_AUTH" in line for line in said), said
    assert f"Flower: http://127.0.0.1:{settings.flower_port};" in service.ready_message()
    assert "--address=127.0.0.1" in flower_argv(settings)


def test_with_a_flower_login_demix_up_gives_it_to_flower_and_to_the_readiness_check(monkeypatch):
    settings = Settings.from_env({"DEMIX_HOST": "127.0.0.2", "DEMIX_API_KEYS": "k1",
                                  "DEMIX_FLOWER_AUTH": "ops:pa55"}, redis_url="redis://127.0.0.1:1/0")
    service = Service(settings)
    started, asked = [], []
    monkeypatch.setattr("demix.cli.supervisor.popen_child", lambda argv, env, **kwargs: started.append((argv, env)))
    monkeypatch.setattr("demix.cli.supervisor._http_ok", lambda url, headers=None: asked.append((url, headers)))
    flower = next(part for part in service.parts() if part.name == "Flower")
    flower.spawn()
    flower.is_ready(None)
    [(argv, env)] = started
    assert env["FLOWER_BASIC_AUTH"] == "ops:pa55" and "pa55" not in " ".join(argv)
    assert "--address=127.0.0.2" in argv
    assert asked == [(f"http://127.0.0.2:{settings.flower_port}/healthcheck", {"Authorization": "Basic b3BzOnBhNTU="})]


def test_a_malformed_flower_login_stops_demix_up_before_anything_starts():
    settings = Settings.from_env({"DEMIX_PORT": str(free_port()), "DEMIX_FLOWER_AUTH": "just-a-password"},
                                 redis_url="redis://127.0.0.1:1/0", model_repo="/models")
    with pytest.raises(ServiceFailed, match="DEMIX_FLOWER_AUTH: login 1 is not user:password"):
        Service(settings).prepare(lambda line: None)


def test_with_a_private_redis_the_other_parts_wait_for_it_and_only_flower_and_grpc_are_optional(tmp_path):
    service = Service(Settings.from_env({}, data_dir=tmp_path))
    service.redis = RedisServer(tmp_path / "redis")  # what `prepare` builds; not started here
    parts = {part.name: part for part in service.parts()}
    assert list(parts) == ["Redis", "worker", "Flower", "gRPC", "API"]
    assert [name for name, part in parts.items() if not part.essential] == ["Flower", "gRPC"]
    assert all(parts[name].requires == ("Redis",) for name in ("worker", "Flower", "gRPC", "API"))


def test_demix_up_refuses_at_once_when_the_api_port_is_taken(tmp_path):
    import socket

    from tests.support.demix_up import DEMIX

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "DEMIX_REDIS_URL"}
        env.update({"DEMIX_PORT": str(port), "DEMIX_DATA_DIR": str(tmp_path)})
        result = subprocess.run([DEMIX, "up"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"127.0.0.1:{port} is already in use (DEMIX_PORT)" in result.stderr
    assert not (tmp_path / "redis").exists()  # nothing was started
