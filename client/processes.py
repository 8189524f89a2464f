"""Stop a process group: SIGTERM everyone in it, wait, then SIGKILL whoever is left (the SuperNode's, the SuperLink's)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def stop_process_group(leader: subprocess.Popen | int, grace: float) -> None:
    """Stop the group that `leader` (a Popen, or the group id of one we did not start) leads, also when the
    leader itself already exited: what it started (an executor, a ServerApp) may still run in its group."""
    pgid = leader if isinstance(leader, int) else leader.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        if isinstance(leader, subprocess.Popen):
            with contextlib.suppress(subprocess.TimeoutExpired):
                leader.wait(timeout=grace)  # reaps the leader, so its exit status stays readable
        if not group_alive(pgid, grace):
            return


def group_alive(pgid: int, wait: float) -> bool:
    """Whether anyone is still in process group `pgid` after up to `wait` seconds."""
    end = time.monotonic() + wait
    while True:
        _reap(pgid)  # members that are our children linger as zombies (still in the group) until reaped
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # someone else's process has taken over the group id: not ours to wait for
        if time.monotonic() >= end:
            return True
        time.sleep(0.2)


def _reap(pgid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-pgid, os.WNOHANG)[0]:
            pass
