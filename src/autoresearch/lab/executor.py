"""Where trials run: the slots an executor offers, and how it runs a trial's supervisor in one of them.

An executor is the one thing that differs between trials on this host and trials on a cluster. It
is handed a trial folder that the lab has filled (train.py and the supervisor's spec), runs the
trial's supervisor (lab.supervisor) in a slot, and leaves the supervisor's files in that folder: the
result, train.log and the checkpoint. Everything that judges the trial (the result's provenance,
the lab's files by content, the decision) stays with the lab, whichever executor ran it.

Invariants every executor keeps:
- `run` returns only when nothing of the trial runs any more, wherever it ran;
- past `limit` seconds, or `STOP_SECONDS` after `stop` is set, the trial is killed;
- a slot whose machine went away gives `Ran.lost` (a reason), never a hang; the lab runs that
  trial again in another slot, and asks `alive` whether the slot can take more.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from autoresearch.errors import UserError

from . import devices
from .processes import die_with_parent

STOP_SECONDS = 15.0  # how long a stopped supervisor gets to tear its sandboxes down before it is killed
SUPERVISOR_LOG = "supervisor.log"  # the supervisor's own output, beside the trial's train.log


class ExecutorError(UserError):
    """The executor cannot offer what was asked (more slots than devices, a cluster that does not answer)."""


@dataclass
class Slot:
    """Where a trial runs: a device type, which GPUs (None: all there are, or on a cluster node those
    its scheduler gives), how many CPU threads and ranks, and for a slot on a cluster node, the node."""

    device: str = "cpu"
    gpus: list[int] | None = None
    threads: int | None = None
    ranks: int = 1  # processes of a data-parallel trial (torchrun), one per GPU
    node: str | None = None  # a cluster node's id; None: this host
    host: str | None = None  # the node's hostname, for people

    @property
    def device_class(self) -> str:
        found = devices.gpus()
        names = [g.name for g in found if self.gpus is None or g.index in self.gpus]
        return devices.device_class(self.device, names if self.device == "cuda" else None, self.threads)

    def describe(self) -> dict:
        """The slot as the ledger keeps it (meta `slots`), for status, the dashboard and the report."""
        return {"device": self.device, "gpus": self.gpus, "threads": self.threads, "ranks": self.ranks,
                "node": self.node, "host": self.host or socket.gethostname(), "device_class": self.device_class}


@dataclass
class Ran:
    """How a supervisor's run ended: its exit code (None: killed), whether it was killed at the trial's
    limit, and, if the slot's machine went away, why."""

    returncode: int | None
    timed_out: bool = False
    lost: str | None = None
    seconds: float = 0.0
    placement: dict = field(default_factory=dict)  # where it ran, beyond the slot (a node, the GPUs it was given)


class Executor:
    """Runs trial supervisors in slots. Subclasses declare `name` and implement `slots` and `run`."""

    name: str = ""

    def slots(self, parallel: int | None = None, gpus_per_trial: int = 1) -> list[Slot]:
        """The slots to run `parallel` trials at once in (None: the executor's default), each of
        `gpus_per_trial` GPUs of one machine; refused with the numbers where there are not enough."""
        raise NotImplementedError

    def run(self, trial_dir: Path, slot: Slot, limit: float, stop: threading.Event | None = None) -> Ran:
        """Run `trial_dir`'s supervisor in `slot` and leave its files in `trial_dir`."""
        raise NotImplementedError

    def alive(self, slot: Slot) -> bool:
        """Whether `slot` can take another trial (False once its machine has gone)."""
        return True

    def close(self) -> None:
        """Let go of what the executor holds (a cluster connection); running nothing is left behind."""


def supervise(trial_dir: Path, limit: float, stop: threading.Event | None = None) -> Ran:
    """Run the supervisor of `trial_dir` as a child of this process, which it dies with (even by kill -9),
    and wait for it: SIGTERM when `stop` is set, SIGKILL to its whole group STOP_SECONDS later or past
    `limit`, or at once if this thread is interrupted. Its output goes to supervisor.log."""
    started = time.monotonic()
    timed_out = False
    with open(trial_dir / SUPERVISOR_LOG, "wb") as errors:
        proc = subprocess.Popen([sys.executable, "-m", "autoresearch.lab.supervisor", str(trial_dir)], stdout=errors,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=trial_dir, start_new_session=True,
                                preexec_fn=partial(die_with_parent, os.getpid()))
        try:
            asked_to_stop = None
            while proc.poll() is None:
                now = time.monotonic()
                if asked_to_stop is None and stop is not None and stop.is_set():
                    proc.send_signal(signal.SIGTERM)
                    asked_to_stop = now
                timed_out = now - started > limit
                if (asked_to_stop is not None and now - asked_to_stop > STOP_SECONDS) or timed_out:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                time.sleep(0.05)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return Ran(None if timed_out else proc.returncode, timed_out=timed_out, seconds=time.monotonic() - started)


class LocalExecutor(Executor):
    """Subprocesses on this host: a slot per GPU, or on a machine without GPUs slots that share its
    CPU threads evenly."""

    name = "local"

    def slots(self, parallel: int | None = None, gpus_per_trial: int = 1) -> list[Slot]:
        gpus, k = devices.gpus(), gpus_per_trial
        if k < 1:
            raise ExecutorError(f"--gpus-per-trial {k}: a trial needs at least one GPU.")
        if gpus:
            most = len(gpus) // k
            n = most if parallel is None else parallel
            if not 1 <= n <= most:
                raise ExecutorError(f"--parallel {n}: this machine has {len(gpus)} GPU(s) ({', '.join(g.name for g in gpus)}), "
                                    f"and a trial slot takes {k}; ask for 1 to {most}" +
                                    (" (or fewer --gpus-per-trial)." if k > 1 else "."))
            return [Slot("cuda", [g.index for g in gpus[s * k:(s + 1) * k]], ranks=k) for s in range(n)]
        if k > 1:
            raise ExecutorError(f"--gpus-per-trial {k}: this machine has no GPU; a trial on several GPUs needs them.")
        n = 1 if parallel is None else parallel
        cpus = devices.cpu_count()
        if not 1 <= n <= cpus:
            raise ExecutorError(f"--parallel {n}: this machine has no GPU and {cpus} CPU thread(s); each CPU slot "
                                f"needs at least one, so ask for 1 to {cpus}.")
        return [Slot("cpu")] if n == 1 else [Slot("cpu", threads=cpus // n) for _ in range(n)]

    def run(self, trial_dir: Path, slot: Slot, limit: float, stop: threading.Event | None = None) -> Ran:
        return supervise(trial_dir, limit, stop)
