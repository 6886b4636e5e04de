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

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from autoresearch.errors import UserError

from . import devices
from .processes import die_with_parent
from .supervisor import PER_TRIAL, SPEC_FILE, SUPERVISOR_LOG, can_stand_by, standby_key

STOP_SECONDS = 15.0  # how long a stopped supervisor gets to tear its sandboxes down before it is killed
TAKE_SECONDS = 10.0  # for a standby to take its trial; one that does not is let go, and a fresh supervisor runs it
STANDBY_PREFIX = ".standby-"  # +pid-n, beside the trial folders: a slot's next sandboxes, made before the trial is known


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

    def keeps_compile_cache(self, slot: Slot) -> bool:
        """Whether trials in `slot` start from, and leave, snapshots of their compile cache (lab.compile_cache):
        their supervisor must reach the lab's own folder."""
        return False

    def close(self) -> None:
        """Let go of what the executor holds (a cluster connection); running nothing is left behind."""


def start_supervisor(argv: list[str], cwd: Path, log: Path, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """A supervisor process (lab.supervisor with `argv`), a child of this process that dies with it (even
    by kill -9), in a session of its own, its output into `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "autoresearch.lab.supervisor", *argv], stdout=out,
                                stderr=subprocess.STDOUT, stdin=stdin, cwd=cwd, start_new_session=True,
                                preexec_fn=partial(die_with_parent, os.getpid()))


def supervise(trial_dir: Path, limit: float, stop: threading.Event | None = None,
              proc: subprocess.Popen | None = None, on_handin=None) -> Ran:
    """Run the supervisor of `trial_dir` (or wait for `proc`, a standby already told the trial) and wait
    for it: SIGTERM when `stop` is set, SIGKILL to its whole group STOP_SECONDS later or past `limit`, or
    at once if this thread is interrupted. Its output goes to supervisor.log. `on_handin` is called once,
    when the trial's checkpoint is in (its clock has stopped), or at the end if it never is."""
    from .supervisor import CHECKPOINT_FILE

    started = time.monotonic()
    timed_out = False
    if proc is None:
        proc = start_supervisor([str(trial_dir)], trial_dir, trial_dir / SUPERVISOR_LOG)
    try:
        asked_to_stop = None
        while proc.poll() is None:
            now = time.monotonic()
            if on_handin is not None and (trial_dir / CHECKPOINT_FILE).exists():
                _call_quietly(on_handin)
                on_handin = None  # once
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
    if on_handin is not None and not (stop is not None and stop.is_set()):
        _call_quietly(on_handin)
    return Ran(None if timed_out else proc.returncode, timed_out=timed_out, seconds=time.monotonic() - started)


def _call_quietly(callback) -> None:
    """Call `callback`; what it raises is dropped. It makes a standby: one that cannot be made (a full disk)
    only leaves the next trial to start as it would without one, and must never end the trial running."""
    try:
        callback()
    except Exception:  # noqa: BLE001 - see above; the next trial's hardware.standby says it had none
        pass


@dataclass
class Standby:
    """A slot's next trial, started before it is known (lab.supervisor --standby): its sandboxes made and
    the trainer's imports done while the slot's current trial is scored and the next one proposed."""

    proc: subprocess.Popen
    folder: Path
    key: dict  # the spec it was made for, but for what is each trial's own (supervisor.standby_key)

    def take(self, trial_dir: Path) -> subprocess.Popen | None:
        """Tell it its trial, and wait for it to take it (its supervisor.log appears in the trial's folder);
        None, and it is let go, if it has ended or does not take it within TAKE_SECONDS."""
        (trial_dir / SUPERVISOR_LOG).unlink(missing_ok=True)
        try:
            self.proc.stdin.write(f"{trial_dir}\n".encode())
            self.proc.stdin.close()
        except OSError:
            pass
        deadline = time.monotonic() + TAKE_SECONDS
        while self.proc.poll() is None and time.monotonic() < deadline:
            if (trial_dir / SUPERVISOR_LOG).exists():
                return self.proc
            time.sleep(0.005)
        self.close()
        return None

    def close(self) -> None:
        """End it: told by the end of its input, which tears its sandboxes down; killed if that takes long."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


class LocalExecutor(Executor):
    """Subprocesses on this host: a slot per GPU, or on a machine without GPUs slots that share its
    CPU threads evenly.

    With `standby`, each slot's next trial is started before it is known: on a GPU slot as soon as the
    current trial has handed its checkpoint in, on a CPU slot once it has ended. The next sandboxes are
    made and the trainer imports torch and its compiler (10-15 s on a GPU host) while the current trial
    is scored (on a GPU) and the next one proposed, so that a trial starts with its imports done. A
    standby is a trial's own fresh sandboxes, made from the same spec, that have run no code of any
    train.py; it is used only by a trial whose spec differs from its own in nothing but the trainer,
    seed and token, and only by sandboxed trials of one process. Its training starts once all its
    processes are done importing, so that they take no CPU from the budget's time.
    None (the default) stands by on GPU slots only: on a CPU the imports compete with whatever runs
    beside them, and trials proposed back to back (the search proposer) gain nothing.

    With `compile_cache`, trials keep torch.compile's cache for later runs (lab.compile_cache); None (the
    default) on GPU slots only, where compiling takes 30 s or more and the CPU template compiles nothing."""

    name = "local"

    def __init__(self, standby: bool | None = None, compile_cache: bool | None = None):
        self.standby = standby
        self.compile_cache = compile_cache
        self._standbys: dict[tuple, list[Standby]] = {}  # by what a slot is: equal CPU slots may share
        self._made = 0
        self._lock = threading.Lock()
        # Standbys are started from this one long-lived thread: a child dies with the thread that started
        # it (PR_SET_PDEATHSIG), and a slot's threads come and go.
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autoresearch-standby")

    def keeps_compile_cache(self, slot: Slot) -> bool:
        return self.compile_cache if self.compile_cache is not None else slot.device == "cuda"

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
        spec = json.loads((trial_dir / SPEC_FILE).read_text())
        slot_key = (slot.device, tuple(slot.gpus or ()), slot.threads, slot.ranks)
        with self._lock:
            waiting = self._standbys.get(slot_key) or []
            standby = waiting.pop(0) if waiting else None
        proc = None
        if standby is not None and standby.key == standby_key(spec):
            proc = standby.take(trial_dir)
        elif standby is not None:  # made for other settings (the workspace's changed since): of no use
            standby.close()
        gpu = slot.device == "cuda"
        stand_by = None
        if (self.standby if self.standby is not None else gpu) and can_stand_by(spec):
            stand_by = partial(self._stand_by, slot_key, trial_dir.parent, spec)
        # On a GPU slot the next trial's imports run beside this one's scoring (the host has CPUs to spare);
        # on a CPU they would slow it down, and run after it, beside the lab's work and the next proposal.
        ran = supervise(trial_dir, limit, stop, proc=proc, on_handin=stand_by if gpu else None)
        if stand_by is not None and not gpu and not (stop is not None and stop.is_set()):
            _call_quietly(stand_by)
        ran.placement["standby"] = proc is not None
        return ran

    def _stand_by(self, slot_key: tuple, trials: Path, spec: dict) -> None:
        """Start a next trial's sandboxes for the slot now, from `spec`, in a folder beside the trials'."""
        # Its processes carry the workspace's part of the token, as a trial's do, so that strays can be found.
        template = {**spec, **dict.fromkeys(PER_TRIAL), "trainer": "",
                    "token": spec.get("token", "").rpartition(":")[0] + ":standby"}
        with self._lock:
            self._made += 1
            folder = trials / f"{STANDBY_PREFIX}{os.getpid()}-{self._made}"

        def start() -> Standby:
            for old in trials.glob(f"{STANDBY_PREFIX}*"):  # a dead lab's (its processes died with it)
                pid = old.name[len(STANDBY_PREFIX):].split("-")[0]
                if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
                    shutil.rmtree(old, ignore_errors=True)
            folder.mkdir(parents=True)
            (folder / SPEC_FILE).write_text(json.dumps(template))
            proc = start_supervisor(["--standby", str(folder)], folder, folder / SUPERVISOR_LOG, stdin=subprocess.PIPE)
            return Standby(proc, folder, standby_key(template))

        standby = self._starter.submit(start).result()
        with self._lock:
            self._standbys.setdefault(slot_key, []).append(standby)

    def close(self) -> None:
        with self._lock:
            standbys = [s for waiting in self._standbys.values() for s in waiting]
            self._standbys = {}
        for standby in standbys:
            standby.close()
        self._starter.shutdown(wait=False)  # its thread ends; a later run starts another
        self._starter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autoresearch-standby")
