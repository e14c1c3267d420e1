"""Imported by the `hold-import-lock` hazard: while a maintenance sweep imports it, its
body sleeps, and the import lock of this module stays held all that time."""
import os
import time

import fork_hazards

if getattr(fork_hazards.held_by_sweep, "active", False):
    (fork_hazards.HAZARD_DIR / f"holding-{os.getpid()}").write_text(str(time.time()))
    time.sleep(float(os.environ.get("DEMIX_TEST_HOLD_S", "120")))
