"""`demix up`: the whole service in one command, kept up.

Starts a private Redis (unless `DEMIX_REDIS_URL` names one), one worker, Flower, the
gRPC interface and the API, prints the URLs once they answer, then watches them. A part that dies is
restarted on its own, after a backoff, with a line saying what died, why and when it
comes back; the others carry on and reconnect to a restarted Redis by themselves (same
port, same append-only file, so queued jobs survive). A part that keeps dying before it
ever answers is broken (a bad setting, a port taken): `demix up` says so with the part's
last output and stops, or, for Flower and the gRPC interface, carries on without it.

Ctrl-C or SIGTERM stops everything in order (the API and the gRPC interface first, so no
new job arrives; Flower; the worker, which hands its running job back; Redis last, which flushes its
append-only file), leaving no process behind.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import typing as tp
import urllib.request

from demix.config import Settings

from demix.cli.argv import flower_argv, worker_node_name
from demix.cli.flower import flower_access_note, flower_address, flower_authorization, flower_environment
from demix.cli.processes import popen_child, stop_process
from demix.cli.redis_server import RedisServer, RedisUnavailable

READY_TIMEOUT_S = 300.0
"""Longest `demix up` waits for the optional parts (Flower, gRPC) before it says the
service is ready without them."""

ANSWER_TIMEOUT_S = 120.0
"""Longest a part may take to answer after a start before it is stopped and started again
(the worker's is longer: DEMIX_WARM_TIMEOUT_S plus `WORKER_ANSWER_MARGIN_S`)."""

WORKER_ANSWER_MARGIN_S = 120.0
"""The worker's own watchdog replaces a pool process that does not get warm within
DEMIX_WARM_TIMEOUT_S: `demix up` gives it that long and this much more before it restarts
the whole worker."""

LIVENESS_INTERVAL_S = 10.0
"""How often a part that answered is asked again whether it is alive (at most)."""

UNANSWERED_RESTART_S = 120.0
"""A part that answered once and then has not answered for this long, while the parts it
requires answer, is restarted (a worker whose main process hangs)."""

TICK_S = 0.5
"""How often the supervisor looks at its parts."""

WAITING_NOTICE_S = 30.0
"""While the service is not yet ready, how often `demix up` says what it still waits for
(a worker loading a large model takes a while; silence would look like a hang)."""

WATCH_INTERVAL_S = 60.0
"""Once the service is up, how often `demix up` runs its watches (`Supervisor.watches`)."""

OUTPUT_TAIL_LINES = 15
"""Lines of a part's output kept to show why it keeps failing."""

WORKER_STOP_MARGIN_S = 15.0
"""Beyond DEMIX_WARM_SHUTDOWN_S, how long `demix up` waits for a stopping worker (which then
stops its pool processes itself, SIGTERM, then SIGKILL) before it kills its process group."""
API_STOP_TIMEOUT_S = 10.0
FLOWER_STOP_TIMEOUT_S = 5.0
GRPC_STOP_TIMEOUT_S = 10.0
REDIS_STOP_TIMEOUT_S = 10.0


class ServiceFailed(RuntimeError):
    """A part of the service cannot be started or kept running."""


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """When a part that died is started again, and when it counts as broken.

    A part that dies is restarted after `initial_delay_s`, doubled with each further
    death up to `max_delay_s`; once it has been up and answering for `healthy_after_s`,
    the next death starts from `initial_delay_s` again. A part that dies before it
    answered `max_failed_starts` times in a row is broken and not restarted again.
    """

    initial_delay_s: float = 1.0
    max_delay_s: float = 30.0
    healthy_after_s: float = 60.0
    max_failed_starts: int = 5

    def delay(self, deaths_in_a_row: int) -> float:
        """Seconds to wait before restarting a part after its `deaths_in_a_row`-th death (1-based)."""
        return min(self.initial_delay_s * 2 ** (max(deaths_in_a_row, 1) - 1), self.max_delay_s)


@dataclasses.dataclass
class Part:
    """One process of the service: how to start it and how to tell that it answers."""

    name: str
    spawn: tp.Callable[[], subprocess.Popen]
    is_ready: tp.Callable[[subprocess.Popen], bool]
    stop_timeout_s: float = 10.0
    essential: bool = True
    """Whether the service is useless without it: when it is broken, `demix up` stops;
    otherwise the service carries on without it."""
    requires: tp.Sequence[str] = ()
    """Names of parts that must answer before this one is first started or checked."""
    log_tail: tp.Optional[tp.Callable[[], str]] = None
    """Its last output, for parts whose output is not piped through us (Redis logs to a file)."""
    hint: str = ""
    """What to check when it keeps failing to start."""
    first_ready_message: str = ""
    """Said the first time it answers."""
    answer_timeout_s: float = ANSWER_TIMEOUT_S
    """Longest it may take to answer after a start; one that has not is stopped and started
    again, as a failed start."""
    is_alive: tp.Optional[tp.Callable[[subprocess.Popen], bool]] = None
    """Once it answered, whether it still does (asked every `LIVENESS_INTERVAL_S`); None: a
    part is alive while its process runs."""
    unanswered_restart_s: float = UNANSWERED_RESTART_S
    """How long `is_alive` may fail in a row before the part is restarted."""


def describe_exit(returncode: int) -> str:
    """Why a process ended, from its return code: `killed by SIGKILL`, `exited with code 1`."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class OutputRelay(threading.Thread):
    """Copies a child's output to ours line by line, prefixed with the part's name,
    keeping the last lines to show why it died."""

    def __init__(self, name: str, stream: tp.BinaryIO, write: tp.Callable[[str], None]):
        super().__init__(name=f"{name}-output", daemon=True)
        self.prefix = f"{name.lower()} | "
        self.stream, self.write = stream, write
        self.tail: collections.deque[str] = collections.deque(maxlen=OUTPUT_TAIL_LINES)

    def run(self) -> None:
        with self.stream:
            for raw in self.stream:
                line = raw.decode(errors="replace").rstrip("\r\n")
                self.tail.append(line)
                try:
                    self.write(self.prefix + line)
                except (OSError, ValueError):
                    pass  # keep draining: a child blocked on a full pipe would hang


@dataclasses.dataclass
class _PartState:
    part: Part
    process: tp.Optional[subprocess.Popen] = None
    relay: tp.Optional[OutputRelay] = None
    started_at: float = 0.0
    ready_at: tp.Optional[float] = None
    ever_ready: bool = False
    deaths_in_a_row: int = 0
    failed_starts_in_a_row: int = 0
    restart_at: tp.Optional[float] = None
    died_at: tp.Optional[float] = None
    given_up: bool = False
    alive_at: float = 0.0
    next_liveness_check: float = 0.0

    @property
    def answering(self) -> bool:
        return self.process is not None and self.ready_at is not None


class Supervisor:
    """Starts parts, restarts the ones that die, and stops them all in reverse order."""

    def __init__(self, parts: tp.Sequence[Part], policy: RestartPolicy = RestartPolicy(),
                 out: tp.Optional[tp.TextIO] = None,
                 watches: tp.Sequence[tp.Callable[[], tp.Optional[str]]] = ()):
        """`watches`: checks of what no process's liveness shows (webhooks that nobody sends),
        run every `WATCH_INTERVAL_S` while every part answers; each returns a warning or None."""
        self.states = {part.name: _PartState(part) for part in parts}
        self.policy = policy
        self.out = out or sys.stdout
        self.watches = list(watches)
        self._next_watch = 0.0
        self._out_lock = threading.Lock()

    def write(self, line: str) -> None:
        with self._out_lock:
            self.out.write(line + "\n")
            self.out.flush()

    def say(self, message: str) -> None:
        """A supervisor event, timestamped."""
        self.write(f"{time.strftime('%H:%M:%S')} demix: {message}")

    def is_answering(self, name: str) -> bool:
        return self.states[name].answering

    def settled(self) -> bool:
        """Every essential part answers, and every other one answers or was given up."""
        return all(state.answering or (state.given_up and not state.part.essential)
                   for state in self.states.values())

    def waiting_for(self) -> list[str]:
        return [name for name, state in self.states.items()
                if not state.answering and not (state.given_up and not state.part.essential)]

    def run(self, stop: threading.Event, on_ready: tp.Callable[[], None],
            ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        """Supervise until `stop` is set; `on_ready` is called once, when all parts first answer
        (or, after `ready_timeout_s`, all essential ones: the others are still being started).

        A part that does not answer is restarted (`Part.answer_timeout_s`, `Part.is_alive`),
        not a reason to stop the service.

        Raises:
            ServiceFailed: an essential part is broken (it kept failing to start).
        """
        started = time.monotonic()
        deadline = started + ready_timeout_s
        next_notice = started + WAITING_NOTICE_S
        announced = False
        while not stop.is_set():
            self.tick()
            if not announced and self.settled():
                on_ready()
                announced = True
            elif not announced and time.monotonic() >= next_notice:
                self.say(f"waiting for {' and '.join(self.waiting_for())} to answer "
                         f"({time.monotonic() - started:.0f}s so far, at most {ready_timeout_s:.0f}s)")
                next_notice += WAITING_NOTICE_S
            elif not announced and time.monotonic() > deadline and \
                    not any(self.states[name].part.essential for name in self.waiting_for()):
                missing = self.waiting_for()
                self.say(f"warning: {' and '.join(missing)} did not answer within {ready_timeout_s:.0f}s; "
                         "the service is ready without it (it is still being started)")
                on_ready()
                announced = True
            stop.wait(TICK_S)

    def tick(self) -> None:
        """Look at every part once: start, check, or restart it as needed."""
        for state in self.states.values():
            self._tick_part(state, time.monotonic())
        now = time.monotonic()
        if self.watches and now >= self._next_watch and self.settled():
            self._next_watch = now + WATCH_INTERVAL_S
            for watch in self.watches:
                warning = watch()
                if warning:
                    self.say(f"warning: {warning}")

    def _tick_part(self, state: _PartState, now: float) -> None:
        part = state.part
        if state.given_up:
            return
        if state.process is None:
            first_start = state.restart_at is None
            if (first_start and self._requirements_answer(part)) or (not first_start and now >= state.restart_at):
                self._spawn(state, now)
            return
        if state.process.poll() is not None:
            self._on_death(state, now)
        elif state.ready_at is None:
            if self._requirements_answer(part) and part.is_ready(state.process):
                self._on_ready(state, time.monotonic())
            elif now - state.started_at >= part.answer_timeout_s and self._requirements_answer(part):
                self._restart_silent(state, now, f"did not answer within {part.answer_timeout_s:g}s of its start")
        else:
            if now - state.ready_at >= self.policy.healthy_after_s:
                state.deaths_in_a_row = 0
            if part.is_alive is not None and now >= state.next_liveness_check:
                self._check_alive(state, now)

    def _check_alive(self, state: _PartState, now: float) -> None:
        part = state.part
        state.next_liveness_check = now + min(LIVENESS_INTERVAL_S, part.unanswered_restart_s / 4)
        # A part cannot answer while a part it needs is down (the worker while Redis restarts).
        if not self._requirements_answer(part) or part.is_alive(state.process):
            state.alive_at = now
        elif now - state.alive_at >= part.unanswered_restart_s:
            self._restart_silent(state, now, f"has not answered for {now - state.alive_at:.0f}s")

    def _requirements_answer(self, part: Part) -> bool:
        return all(self.states[name].answering for name in part.requires)

    def _spawn(self, state: _PartState, now: float) -> None:
        part = state.part
        state.restart_at = None
        state.started_at = now
        try:
            state.process = part.spawn()
        except (OSError, RedisUnavailable) as exc:
            self._on_failed_start(state, now, f"{part.name} could not be started: {exc}")
            return
        if state.process.stdout is not None:
            state.relay = OutputRelay(part.name, state.process.stdout, self.write)
            state.relay.start()
        if state.died_at is not None:
            self.say(f"restarted {part.name} (pid {state.process.pid})")

    def _on_ready(self, state: _PartState, now: float) -> None:
        state.ready_at = state.alive_at = now
        state.next_liveness_check = now + min(LIVENESS_INTERVAL_S, state.part.unanswered_restart_s / 4)
        state.failed_starts_in_a_row = 0
        if not state.ever_ready and state.part.first_ready_message:
            self.say(state.part.first_ready_message)
        state.ever_ready = True
        if state.died_at is not None:
            self.say(f"{state.part.name} is back (pid {state.process.pid}), answering "
                     f"{now - state.died_at:.1f}s after it died")

    def _on_death(self, state: _PartState, now: float) -> None:
        process = state.process
        # Its group's leftovers (Celery pool processes, gunicorn workers holding the port) go too.
        stop_process(process, timeout=0)
        self._on_ended(state, now, f"died: {describe_exit(process.returncode)}")

    def _restart_silent(self, state: _PartState, now: float, what: str) -> None:
        """Stop a part that does not answer (SIGTERM, then its whole group SIGKILLed) and
        start it again."""
        self.say(f"{state.part.name} (pid {state.process.pid}) {what}; stopping it")
        stop_process(state.process, state.part.stop_timeout_s)
        self._on_ended(state, now, what)

    def _on_ended(self, state: _PartState, now: float, reason: str) -> None:
        process = state.process
        if state.relay is not None:
            state.relay.join(2)
        was_answering = state.ready_at is not None
        state.process, state.ready_at, state.died_at = None, None, now
        uptime = now - state.started_at
        what = f"{state.part.name} (pid {process.pid}) {reason}"
        if was_answering:
            state.deaths_in_a_row += 1
            self._schedule_restart(state, now, f"{what}, after {uptime:.1f}s up")
        else:
            self._on_failed_start(state, now, f"{what}, {uptime:.1f}s after it started, before it answered")

    def _on_failed_start(self, state: _PartState, now: float, what: str) -> None:
        part = state.part
        state.deaths_in_a_row += 1
        state.failed_starts_in_a_row += 1
        if state.failed_starts_in_a_row < self.policy.max_failed_starts:
            self._schedule_restart(state, now, what)
            return
        state.given_up = True
        tail = (part.log_tail() if part.log_tail else
                "\n".join(state.relay.tail) if state.relay is not None else "").strip()
        message = (f"{what} ({state.failed_starts_in_a_row} times in a row); it is not restarted again."
                   + (f" {part.hint}" if part.hint else "")
                   + (f"\nIts last output:\n{tail}" if tail else ""))
        if part.essential:
            raise ServiceFailed(message)
        self.say(f"warning: {message}\nThe rest of the service carries on without {part.name}.")

    def _schedule_restart(self, state: _PartState, now: float, what: str) -> None:
        delay = self.policy.delay(state.deaths_in_a_row)
        state.restart_at = now + delay
        self.say(f"{what}; restarting it in {delay:g}s")

    def stop(self) -> None:
        """Stop every part, the last started first; no part is restarted afterwards."""
        for state in reversed(list(self.states.values())):
            state.given_up = True
            if state.process is not None:
                stop_process(state.process, state.part.stop_timeout_s)
            if state.relay is not None:
                state.relay.join(5)
            state.process = None


class Service:
    """The parts `demix up` runs, built from the settings."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis: tp.Optional[RedisServer] = None
        self.redis_url = settings.redis_url
        self.flower_enabled = settings.flower_port != 0
        self.grpc_enabled = settings.grpc_port != 0
        self._pinger: tp.Any = None
        self._worker_spawned_at = 0.0

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    @property
    def flower_url(self) -> str:
        return f"http://{flower_address(self.settings)}:{self.settings.flower_port}"

    def prepare(self, say: tp.Callable[[str], None]) -> None:
        """What must hold before any part starts: free ports, the model in the cache.

        Raises:
            ServiceFailed: the API's port is taken, or no Redis binary exists.
        """
        settings = self.settings
        if _port_taken(settings.host, settings.port):
            raise ServiceFailed(f"{settings.host}:{settings.port} is already in use (DEMIX_PORT): "
                                "is demix already running? Stop it or choose another port")
        if self.flower_enabled:
            try:
                flower_environment(settings, {})
            except ValueError as exc:
                raise ServiceFailed(str(exc)) from None
            flower_host = flower_address(settings)
            if settings.flower_port == settings.port or _port_taken(flower_host, settings.flower_port):
                say(f"warning: {flower_host}:{settings.flower_port} is already in use (DEMIX_FLOWER_PORT); "
                    "running without Flower (set DEMIX_FLOWER_PORT to a free port, or 0 to silence this)")
                self.flower_enabled = False
            elif note := flower_access_note(settings):
                say(note)
        if self.grpc_enabled and (settings.grpc_port in (settings.port, settings.flower_port)
                                  or _port_taken(settings.host, settings.grpc_port)):
            say(f"warning: {settings.host}:{settings.grpc_port} is already in use (DEMIX_GRPC_PORT); "
                "running without the gRPC interface (set DEMIX_GRPC_PORT to a free port, or 0 to silence this)")
            self.grpc_enabled = False
        if not self.redis_url:
            try:
                self.redis = RedisServer(settings.data_dir / "redis", persist=True)
            except RedisUnavailable as exc:
                raise ServiceFailed(str(exc)) from None
            self.redis_url = self.redis.url
        else:
            say(f"using Redis at {self.redis_url}")
        if not settings.model_repo:
            self._ensure_model(say)

    def _ensure_model(self, say: tp.Callable[[str], None]) -> None:
        """Fetch every served model (`DEMIX_MODELS`) into the local cache before the first
        job needs it, with a progress bar here rather than a silent wait inside the worker."""
        for name in self.settings.served_models:
            pull = popen_child([sys.executable, "-m", "demix.cli.main", "models", "pull", name, "--if-missing"],
                               env=self._child_env())
            try:
                returncode = pull.wait()
            finally:
                stop_process(pull, timeout=5)  # on Ctrl-C mid-download
            if returncode != 0:
                say(f"warning: model {name!r} is not available yet; its jobs will fail "
                    "with a message saying how to provide weights")

    def _child_env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # log lines reach us as they happen
        if self.redis_url:
            env["DEMIX_REDIS_URL"] = self.redis_url
        return env

    def parts(self) -> list[Part]:
        """Redis (when private), the worker, Flower (unless disabled), the gRPC interface and
        the API, in start order (stopped in reverse)."""
        parts = []
        after_redis: tuple[str, ...] = ()
        if self.redis is not None:
            redis_server = self.redis
            parts.append(Part(
                "Redis", spawn=redis_server.spawn, is_ready=lambda _process: redis_server.is_ready(),
                stop_timeout_s=REDIS_STOP_TIMEOUT_S, log_tail=redis_server.log_tail,
                hint=f"Its log is {redis_server.log_path}.",
                first_ready_message=f"started private Redis ({redis_server.binary}) on port {redis_server.port}"))
            after_redis = ("Redis",)
        parts.append(Part(
            "worker", spawn=self._spawn_worker, is_ready=self._worker_answers,
            stop_timeout_s=self.settings.warm_shutdown_s + WORKER_STOP_MARGIN_S, requires=after_redis,
            hint="Check the DEMIX_* settings of the worker (`demix config`).",
            answer_timeout_s=self.settings.warm_timeout_s + WORKER_ANSWER_MARGIN_S,
            is_alive=self._worker_pings))
        if self.flower_enabled:
            parts.append(Part(
                "Flower", spawn=self._spawn_flower,
                # Flower 2.2 asks no login of /healthcheck; the login goes along all the same,
                # so a Flower that does still counts as answering.
                is_ready=lambda _process: _http_ok(_local(self.flower_url) + "/healthcheck",
                                                   flower_authorization(self.settings)),
                stop_timeout_s=FLOWER_STOP_TIMEOUT_S, essential=False, requires=after_redis,
                hint="Is DEMIX_FLOWER_PORT free? (0 disables Flower.)"))
        if self.grpc_enabled:
            parts.append(Part(
                "gRPC", spawn=lambda: self._spawn(["grpc"]),
                is_ready=lambda _process: _tcp_ok(self.settings.host, self.settings.grpc_port),
                stop_timeout_s=GRPC_STOP_TIMEOUT_S, essential=False, requires=after_redis,
                hint="Is DEMIX_GRPC_PORT free?"))
        parts.append(Part(
            "API", spawn=lambda: self._spawn(["api"]),
            is_ready=lambda _process: _http_ok(_local(self.url) + "/healthz"),
            stop_timeout_s=API_STOP_TIMEOUT_S, requires=after_redis,
            hint="Are DEMIX_HOST and DEMIX_PORT right, and is the port free?"))
        return parts

    def _spawn(self, command: list[str]) -> subprocess.Popen:
        return popen_child([sys.executable, "-m", "demix.cli.main", *command], env=self._child_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def _spawn_worker(self) -> subprocess.Popen:
        self._worker_spawned_at = time.time()
        return self._spawn(["worker"])

    def _spawn_flower(self) -> subprocess.Popen:
        # Its login goes in its environment: a command line is anyone's to read (`ps`).
        return popen_child(flower_argv(self.settings), env=flower_environment(self.settings, self._child_env()),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def _worker_answers(self, process: subprocess.Popen) -> bool:
        """Whether this worker process (by its node name) answers a Celery ping and has
        loaded and warmed its model (`demix.readiness`), so its first job starts at once."""
        try:
            return self._worker_pings(process) and _worker_warm(self.redis_url, self._worker_spawned_at)
        except Exception:  # Redis restarting: not answering yet
            return False

    def _worker_pings(self, process: subprocess.Popen) -> bool:
        """Whether the worker's main process answers a Celery ping (its event loop turns)."""
        if self._pinger is None:
            from demix.celery_app import make_celery
            self._pinger = make_celery(dataclasses.replace(self.settings, redis_url=self.redis_url))
        try:
            # A fresh connection each time: a pooled one may predate a Redis restart.
            with self._pinger.connection_for_write() as connection:
                return bool(self._pinger.control.ping(
                    destination=[worker_node_name(process.pid, socket.gethostname())],
                    timeout=0.5, connection=connection))
        except Exception:  # Redis restarting: not answering
            return False

    def watches(self) -> list[tp.Callable[[], tp.Optional[str]]]:
        """What `demix up` checks every minute beside its parts' liveness."""
        return [self.webhooks_stalled]

    def webhooks_stalled(self) -> tp.Optional[str]:
        """A warning when webhooks are overdue and no webhook sender is alive (every worker's
        background process is down or stuck), else None."""
        try:
            health = _webhook_health(self.redis_url)
        except Exception:  # Redis restarting: the parts' own checks say so
            return None
        if not health.stalled:
            return None
        return (f"{health.overdue} webhook(s) overdue ({health.pending} pending) and no webhook sender "
                "is alive: the worker's background process, which sends them, is not running (see the "
                "worker's log); they go out once it runs again")

    def close(self) -> None:
        if self._pinger is not None:
            self._pinger.close()

    def ready_message(self) -> str:
        flower = f"; Flower: {self.flower_url}" if self.flower_enabled else ""
        grpc = f"; gRPC (demixing.proto): {self.settings.host}:{self.settings.grpc_port}" if self.grpc_enabled else ""
        return f"demix is ready: {self.url}  (POST {self.url}/v1/jobs{flower}{grpc}; Ctrl-C stops)"


def _worker_warm(redis_url: str, since: float) -> bool:
    """Whether a worker process started after `since` has warmed its model (`demix.readiness`)."""
    import redis

    from demix.readiness import ready_workers

    with redis.Redis.from_url(redis_url, socket_timeout=2) as client:
        return bool(ready_workers(client, since))


def _webhook_health(redis_url: str) -> tp.Any:
    """`demix.jobs.webhook_health.webhook_health` of the service's Redis."""
    import redis

    from demix.jobs.webhook_health import webhook_health

    with redis.Redis.from_url(redis_url, socket_timeout=2) as client:
        return webhook_health(client)


def _local(url: str) -> str:
    """`url` with a wildcard bind address replaced by one we can connect to."""
    return url.replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//[::1]:")


def _http_ok(url: str, headers: tp.Optional[tp.Mapping[str, str]] = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=dict(headers or {})), timeout=1) as response:
            return response.status == 200
    except Exception:
        return False


def _tcp_ok(host: str, port: int) -> bool:
    """Whether something accepts connections on `host:port` (a wildcard host: on this machine)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(host, host)
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _port_taken(host: str, port: int) -> bool:
    """Whether something already listens on (or holds) `host:port`."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        return False  # the part itself will report the bad address
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            probe.bind(address)
        except OSError:
            return True
    return False


def run_up(settings: Settings) -> int:
    """Run and supervise the service until Ctrl-C or SIGTERM; returns the process exit code."""
    service = Service(settings)
    supervisor: tp.Optional[Supervisor] = None
    stop_requested = threading.Event()
    exit_code = 0

    def interrupt(_signum: int, _frame: tp.Any) -> None:
        raise KeyboardInterrupt

    def request_stop(_signum: int, _frame: tp.Any) -> None:
        # Only a flag: the loop stops between two checks, never halfway through a restart.
        stop_requested.set()

    def announce_ready() -> None:
        print(service.ready_message(), flush=True)

    signal.signal(signal.SIGTERM, interrupt)  # a model download is interrupted at once
    try:
        service.prepare(lambda message: print(message, flush=True))
        supervisor = Supervisor(service.parts(), watches=service.watches())
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        supervisor.run(stop_requested, on_ready=announce_ready)
        print("stopping demix ...", flush=True)
    except KeyboardInterrupt:
        print("stopping demix ...", flush=True)
    except ServiceFailed as exc:
        print(f"demix up failed: {exc}", file=sys.stderr, flush=True)
        exit_code = 1
    finally:
        # A second Ctrl-C or SIGTERM must not cut the shutdown short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if supervisor is not None:
            supervisor.stop()
        service.close()
        print("demix stopped", flush=True)
    return exit_code
