"""Loaded at start-up by every Python process of a worker under test whose PYTHONPATH
names this folder (the main process, its background process, and by fork its pool
processes), when `DEMIX_TEST_FORK_HAZARD` asks for a hazard (comma-separated):

- `hold-import-lock`: a maintenance sweep imports `slow_import_under_test`, whose body
  holds that module's import lock for `DEMIX_TEST_HOLD_S` seconds (after writing
  `holding-<pid>` into `DEMIX_TEST_HAZARD_DIR`); every pool process imports the same
  module before its warm-up. A pool process forked from a process where the sweep is
  holding the lock waits for it for ever, as in the hang this reproduces.
- `hang-first-warm-up` / `hang-every-warm-up`: the first (or every) pool process blocks
  for ever in `hang_on_purpose` before its warm-up (after writing `hanging-<pid>`).

Nothing here runs unless the variable is set.
"""
import os

HAZARDS = set(filter(None, os.environ.get("DEMIX_TEST_FORK_HAZARD", "").split(",")))

if HAZARDS:
    import fork_hazards  # noqa: F401  (beside this file)
