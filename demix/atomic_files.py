"""Publishing files atomically: the one "write to a temporary name, then rename" helper.

A file is written under a hidden temporary name in the folder of its final name (so
the rename never crosses filesystems), flushed to disk, then renamed over the final
name. Readers see either no file or the whole file, never part of one; a writer that
fails or is interrupted leaves no temporary file behind (a crash can, but such files
are hidden and `is_temporary` tells sweeps and listings to skip them).

    with atomic_open(path) as file:      # a file object, for bytes written here
        file.write(payload)

    with atomic_path(path) as temporary: # a path, for writers that open files themselves
        soundfile.write(temporary, ...)

`PendingFile` is the same for writes whose start and end are in different places.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import typing as tp
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"
"""Every temporary name is `.<final name>.<random hex>.tmp`."""


def temporary_name(final: Path) -> Path:
    """A fresh hidden name beside `final`, unique per call (concurrent writers never share one)."""
    return final.with_name(f".{final.name}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}")


def is_temporary(path: Path) -> bool:
    """Whether `path` is a (possibly abandoned) temporary file of this module."""
    return path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX)


def publish_file(temporary: Path, final: Path) -> Path:
    """Flush the complete file `temporary` to disk and rename it over `final`.

    The folder is flushed too, so after a power cut the new name is either fully there or
    not at all. Returns `final`.
    """
    _fsync(temporary, os.O_RDONLY)
    os.replace(temporary, final)
    _fsync(final.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    return final


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:
        # Some filesystems cannot fsync a directory; the rename is still atomic there.
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


class PendingFile:
    """A file being written under a temporary name beside `final`, until `commit` or `discard`.

    `final`'s folder must exist: it is not created here, so a writer whose folder was
    deleted meanwhile (a deleted job) fails instead of bringing the folder back.
    """

    def __init__(self, final: Path):
        self.final = Path(final)
        self.temporary = temporary_name(self.final)

    def commit(self) -> Path:
        """Make the complete file visible under its final name; returns that name.

        Raises:
            OSError: flushing or renaming failed; the temporary file is then removed.
        """
        try:
            return publish_file(self.temporary, self.final)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        """Remove the temporary file (if any); the final name is left as it was."""
        self.temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(final: Path) -> tp.Iterator[Path]:
    """Yield a temporary path to write `final`'s content to; published when the block ends,
    removed if it raises. The file must be closed by the end of the block."""
    pending = PendingFile(final)
    try:
        yield pending.temporary
    except BaseException:
        pending.discard()
        raise
    pending.commit()


@contextlib.contextmanager
def atomic_open(final: Path, mode: str = "wb") -> tp.Iterator[tp.IO]:
    """Open a temporary file for writing `final`; closed and published when the block ends,
    removed if it raises."""
    with atomic_path(final) as temporary, open(temporary, mode) as file:
        yield file
