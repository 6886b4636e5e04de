"""Stopping what the lab started: a process group, and every process that carries the lab's token
in its environment, which children that left the group (setsid, daemons) keep."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

PROC = Path("/proc")


def die_with_parent(parent: int) -> None:
    """In a child between fork and exec: be killed when `parent` (the process that forked it) dies,
    even by kill -9. A parent that died before the request reached the kernel has already gone, so
    the child then ends itself rather than live on as an orphan."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)


def kill_tagged(variable: str, token: str, pgid: int | None = None) -> int:
    """SIGKILL the process group `pgid` and every process whose environment holds `variable=token` or
    `variable=token/...` (a part of what `token` names). Returns how many were found alive."""
    found = 0
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)
            found += 1
        except (ProcessLookupError, PermissionError):
            pass
    needle = f"{variable}={token}".encode()
    if PROC.is_dir():
        for entry in PROC.iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if any(v == needle or v.startswith(needle + b"/") for v in (entry / "environ").read_bytes().split(b"\0")):
                    os.kill(int(entry.name), signal.SIGKILL)
                    found += 1
            except (OSError, ValueError):
                continue
    return found


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies, which wait for a parent, do not count)."""
    if PROC.is_dir():
        for entry in PROC.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
