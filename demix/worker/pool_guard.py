"""Guards a Celery worker's prefork pool from its main process: forks that copy no held
lock, a watchdog that replaces a pool process that never gets warm, and a shutdown that
always ends.

- **Forks.** The main process runs no thread of ours (the sweeps and the webhook sender
  run in `demix.worker.background`'s process), so a fork copies one thread, the forking one,
  which holds no lock. `report_threads_at_fork` checks that before every fork and logs an
  error naming any other Python thread, so a library that starts one is seen at once. Each pool
  process is tied to the main process (it gets SIGKILL when that one dies: a hung pool
  process must not outlive its worker) and dumps its Python stack on `STACK_SIGNAL`.
- **Watchdog.** A pool process loads and warms its models before it tells Celery it is
  up. One still not up `DEMIX_WARM_TIMEOUT_S` after it appeared is asked for its stack
  (written to the worker's log), then killed; Celery starts another in its place. Each
  such kill counts in `/metrics` (`demix_pool_warm_timeouts`).
- **Shutdown.** A warm shutdown that has not ended after `DEMIX_WARM_SHUTDOWN_S` (a pool
  process that never answers keeps Celery's `Pool.join` waiting for ever) turns cold:
  the pool processes get SIGTERM, then SIGKILL, and the main process exits at the latest
  `KILL_GRACE_S` after that.

All of it runs in the main process's one thread: from Celery's event loop (its timer) and
from a SIGALRM handler, never from a thread of its own.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
import typing as tp

import redis
from celery import bootsteps

from demix.config import Settings, get_settings
from demix.host_processes import die_with_parent
from demix.jobs.metrics import count_warm_timeout
from demix.readiness import worker_status_path, write_worker_status

from demix.worker.background import BackgroundProcess

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 5.0
"""How often the main process looks at its pool processes and its background process."""

STACK_SIGNAL = signal.SIGUSR2
"""Makes a pool process that is not yet up write every thread's Python stack to stderr
(`faulthandler`, which needs no lock, so it works in a process that hangs on one).
SIGUSR1 is Celery's own."""

STACK_WAIT_S = 2.0
"""Time a hung pool process gets to write its stack before it is killed."""

KILL_GRACE_S = 5.0
"""Between the escalation steps of a shutdown that does not end: SIGTERM, SIGKILL, exit."""


def report_threads_at_fork() -> None:
    """Before a fork of the main process: log an error when another Python thread runs (an
    import lock, a logging handler's lock or a Redis pool's lock it holds at this instant
    would stay held in the child for ever).

    Threads that C libraries start and that run no Python are left out: the one numpy's
    OpenBLAS keeps stops itself in its own `pthread_atfork` handler before the fork
    (tests/worker/test_pool_guard.py shows it), and torch, imported here before the first fork,
    runs nothing here, so its thread pools start only in the pool processes.
    """
    others = [thread.name for thread in threading.enumerate() if thread is not threading.current_thread()]
    if others:
        log.error("forking a pool process while %d other thread(s) run in the worker's main process "
                  "(%s): a lock one of them holds now stays held in the pool process",
                  len(others), ", ".join(others))


def prepare_pool_process(main_pid: int) -> None:
    """First thing in a new pool process (after the fork, before Celery's own set-up)."""
    die_with_parent(signal.SIGKILL, main_pid)
    faulthandler.register(STACK_SIGNAL, file=sys.__stderr__, all_threads=True, chain=False)


def celery_pool_processes(worker: tp.Any) -> dict[int, bool]:
    """The worker's live pool processes: pid -> whether it told Celery it is up.

    A pool process sends Celery WORKER_UP once the `worker_process_init` handlers (our
    warm-up) have returned; Celery then adds its input pipe to the ones it writes jobs to.
    Where that bookkeeping is missing (another pool, another Celery), every process counts
    as up: the watchdog then never kills a healthy one.
    """
    pool = getattr(worker.pool, "_pool", None)  # billiard's AsynPool, once the pool started
    writable = getattr(pool, "_all_inqueues", None)
    if pool is None or writable is None:
        return {}
    return {process.pid: getattr(process, "inqW_fd", None) in writable
            for process in list(getattr(pool, "_pool", ())) if process.pid and process.exitcode is None}


class PoolWatchdog:
    """Replaces pool processes that are not up `warm_timeout_s` after they appeared.

    Args:
        pool_processes: the live pool processes, pid -> whether it is up.
        call_later: runs a function after some seconds, on the caller's thread (the timer).
        count_timeout: records one more replaced process (the metric).
    """

    def __init__(self, warm_timeout_s: float, pool_processes: tp.Callable[[], dict[int, bool]],
                 call_later: tp.Callable[[float, tp.Callable[[], None]], tp.Any],
                 count_timeout: tp.Callable[[], None], clock: tp.Callable[[], float] = time.monotonic):
        self.warm_timeout_s = warm_timeout_s
        self.pool_processes, self.call_later, self.count_timeout = pool_processes, call_later, count_timeout
        self.clock = clock
        self.first_seen: dict[int, float] = {}
        self.replacing: set[int] = set()
        self.timeouts = 0

    def check(self) -> dict[int, str]:
        """Look at the pool once; returns each live pool process's state: `warm`,
        `warming` or `replacing`."""
        now = self.clock()
        processes = self.pool_processes()
        self.first_seen = {pid: self.first_seen.get(pid, now) for pid in processes}
        self.replacing &= set(processes)
        for pid, up in processes.items():
            age = now - self.first_seen[pid]
            if not up and pid not in self.replacing and age >= self.warm_timeout_s:
                self.replace(pid, age)
        return {pid: "warm" if up else "replacing" if pid in self.replacing else "warming"
                for pid, up in processes.items()}

    def replace(self, pid: int, age: float) -> None:
        self.replacing.add(pid)
        self.timeouts += 1
        log.error("pool process %d is not warm %.0fs after it started (DEMIX_WARM_TIMEOUT_S=%g): "
                  "killing it so that another takes its place; what it was doing, its Python stack, "
                  "follows", pid, age, self.warm_timeout_s)
        _signal(pid, STACK_SIGNAL)
        self.call_later(STACK_WAIT_S, lambda: _signal(pid, signal.SIGKILL))
        try:
            self.count_timeout()
        except redis.RedisError as exc:  # the kill matters, the count less
            log.warning("could not count the replaced pool process in Redis: %s", exc)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class ShutdownBound:
    """Ends a shutdown that does not end by itself, from SIGALRM (the main thread is then
    blocked in `Pool.join`, which a signal handler interrupts): after `after_s`, SIGTERM to
    the pool processes (what a cold shutdown does), `KILL_GRACE_S` later SIGKILL, and
    `KILL_GRACE_S` after that the main process exits."""

    def __init__(self, pool_pids: tp.Callable[[], list[int]]):
        self.pool_pids = pool_pids
        self.step = 0
        self.armed = False

    def arm(self, after_s: float, how: str) -> None:
        if self.armed or threading.current_thread() is not threading.main_thread():
            return  # an in-process test worker runs in a thread: nothing to bound there
        self.armed, self.how = True, how
        signal.signal(signal.SIGALRM, self._escalate)
        signal.setitimer(signal.ITIMER_REAL, max(after_s, 0.1))

    def _escalate(self, _signum: int, _frame: tp.Any) -> None:
        self.step += 1
        pids = self.pool_pids()
        if self.step == 1:
            log.error("the %s shutdown has not ended in time: stopping pool processes %s (SIGTERM)",
                      self.how, pids)
            for pid in pids:
                _signal(pid, signal.SIGTERM)
        elif self.step == 2:
            log.error("pool processes %s still run: killing them (SIGKILL)", pids)
            for pid in pids:
                _signal(pid, signal.SIGKILL)
        else:
            log.error("the worker's shutdown does not end: exiting now")
            logging.shutdown()
            os._exit(1)
        signal.setitimer(signal.ITIMER_REAL, KILL_GRACE_S)


class BackgroundStep(bootsteps.StartStopStep):
    """Worker bootstep: the background process (sweeps, webhooks) runs while the worker
    runs, and is started again if it dies."""

    requires = ("celery.worker.components:Timer",)

    def __init__(self, worker: tp.Any, **kwargs: tp.Any):
        super().__init__(worker, **kwargs)
        self.background = BackgroundProcess()
        self.timer_entry: tp.Any = None

    def start(self, worker: tp.Any) -> None:
        self.background.start()
        self.timer_entry = worker.timer.call_repeatedly(WATCH_INTERVAL_S, self.background.check)

    def stop(self, worker: tp.Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
        self.background.stop()

    terminate = stop


class PoolGuard(bootsteps.StartStopStep):
    """Worker bootstep of prefork workers: the fork hooks, the watchdog (with the status
    file probes read) and the shutdown bound."""

    requires = ("celery.worker.components:Pool", "celery.worker.components:Timer")

    def __init__(self, worker: tp.Any, **kwargs: tp.Any):
        super().__init__(worker, **kwargs)
        self.settings: Settings = get_settings()
        self.redis: tp.Optional[redis.Redis] = None
        self.watchdog: tp.Optional[PoolWatchdog] = None
        self.shutdown = ShutdownBound(lambda: list(celery_pool_processes(self.worker)))
        self.timer_entry: tp.Any = None
        self.worker = worker

    def include_if(self, worker: tp.Any) -> bool:
        from celery.concurrency.prefork import TaskPool

        return isinstance(worker.pool_cls, type) and issubclass(worker.pool_cls, TaskPool)

    def create(self, worker: tp.Any) -> None:
        # Before the pool's first fork (the Pool step creates the pool; it forks when it starts).
        # What every pool process imports before it is warm (torch, the engine, the runner) is
        # imported once here, in the one thread: a new pool process starts without importing
        # it again, and shares its pages. Importing torch starts no thread and runs nothing on
        # its thread pools (they start in each pool process, at its first forward).
        from demix.worker import runner  # noqa: F401
        main_pid = os.getpid()
        os.register_at_fork(before=report_threads_at_fork,
                            after_in_child=lambda: prepare_pool_process(main_pid))

    def start(self, worker: tp.Any) -> None:
        from demix.services import redis_client

        self.redis = redis_client(self.settings, connect_timeout_s=2, socket_timeout_s=5)
        self.watchdog = PoolWatchdog(self.settings.warm_timeout_s, lambda: celery_pool_processes(worker),
                                     worker.timer.call_after, lambda: count_warm_timeout(self.redis))
        self.timer_entry = worker.timer.call_repeatedly(WATCH_INTERVAL_S, self.check)
        self.check()

    def check(self) -> None:
        assert self.watchdog is not None
        pool = self.watchdog.check()
        try:
            write_worker_status(self.settings.data_dir, {"pool": {str(pid): state for pid, state in pool.items()},
                                                         "warm_timeouts": self.watchdog.timeouts})
        except OSError as exc:  # a full disk must not stop the watchdog
            log.warning("could not write the worker's status file: %s", exc)

    def stop(self, worker: tp.Any) -> None:
        self._stopping("warm", self.settings.warm_shutdown_s)

    def terminate(self, worker: tp.Any) -> None:
        # Celery's cold shutdown first waits DEMIX_SOFT_SHUTDOWN_S for runs to hand back.
        self._stopping("cold", self.settings.soft_shutdown_s + KILL_GRACE_S)

    def _stopping(self, how: str, bound_s: float) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
        self.shutdown.arm(bound_s, how)
        worker_status_path(self.settings.data_dir, os.getpid()).unlink(missing_ok=True)
        if self.redis is not None:
            self.redis.close()
