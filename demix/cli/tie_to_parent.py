"""`python -I -S tie_to_parent.py PARENT_PID PROGRAM [ARG ...]`: become PROGRAM, tied to
PARENT_PID's life.

Linux sends the signal set with PR_SET_PDEATHSIG to a process when its parent dies, even by
SIGKILL, and keeps that setting across exec. It must be set in the child, between fork and
exec. subprocess's `preexec_fn` could do it, but runs Python in a fork of a multi-threaded
parent (`demix up` relays its children's output on threads), where a lock another thread
held at the fork is never released: the subprocess docs warn it can deadlock, leaving a
child that never execs. This small program does it in a process of its own instead.

It is run by path, with neither site-packages nor the user's PYTHON* settings, so it starts
in a few milliseconds and imports nothing of the project.
"""
import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    parent, argv = int(sys.argv[1]), sys.argv[2:]
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        sys.exit(f"tie_to_parent: prctl failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() != parent:  # it died before the tie was made: the signal will never come
        sys.exit(f"tie_to_parent: parent {parent} is gone")
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
