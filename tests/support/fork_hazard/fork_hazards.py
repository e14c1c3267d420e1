"""The hazards `sitecustomize` installs (its docstring says which and how)."""
import os
import threading
import time
from pathlib import Path

from celery import signals

HAZARDS = set(filter(None, os.environ.get("DEMIX_TEST_FORK_HAZARD", "").split(",")))
HAZARD_DIR = Path(os.environ.get("DEMIX_TEST_HAZARD_DIR", "."))

held_by_sweep = threading.local()


def hold_an_import_lock(_context) -> None:
    held_by_sweep.active = True
    try:
        import slow_import_under_test  # noqa: F401  its body holds the import lock for a while
    finally:
        held_by_sweep.active = False


def import_the_slow_module(**_kwargs) -> None:
    import slow_import_under_test  # noqa: F401


def hang_on_purpose() -> None:
    (HAZARD_DIR / f"hanging-{os.getpid()}").write_text(str(time.time()))
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()  # never returns


def maybe_hang(**_kwargs) -> None:
    if "hang-every-warm-up" in HAZARDS:
        hang_on_purpose()
    try:  # only the first pool process of the test claims the hang
        os.close(os.open(HAZARD_DIR / "hang-claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    hang_on_purpose()


if "hold-import-lock" in HAZARDS:
    from demix.worker.maintenance import SWEEPS, Sweep

    SWEEPS.append(Sweep("hold an import lock (test hazard)", hold_an_import_lock, lambda _settings: 3600.0))
    signals.worker_process_init.connect(import_the_slow_module, weak=False)

if HAZARDS & {"hang-first-warm-up", "hang-every-warm-up"}:
    signals.worker_process_init.connect(maybe_hang, weak=False)
