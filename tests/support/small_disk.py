"""A real, small filesystem for tests of a full disk: a tmpfs mounted for one test."""
from __future__ import annotations

import contextlib
import subprocess
import typing as tp
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, size: str, covered_elsewhere_by: str) -> tp.Iterator[Path]:
    """A tmpfs of `size` (mount's `size=`, e.g. "256k") at `mount_point`, unmounted after.
    Where mounting is not allowed the test is skipped, saying which test covers the same
    path without a real disk (`covered_elsewhere_by`)."""
    mount_point.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); {covered_elsewhere_by} "
                    "covers the same path")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)
