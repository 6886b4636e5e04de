"""One trial's trusted side, in a process of its own: the sandboxes, the data, the clock, the score.

    python -m autoresearch.lab.supervisor TRIAL_DIR

The lab writes TRIAL_DIR/spec.json and starts this process; it writes TRIAL_DIR/result.json, and the
lab takes a result only from a supervisor that exited 0. It:

1. starts train.py in a sandbox at once, with its output piped into TRIAL_DIR/train.log, and beside
   it the two model processes that will score it, each in a scoring sandbox of its own; those import
   torch while the trainer starts up, and run no code of train.py until the checkpoint is in;
2. serves the trainer rows of tokens on a Unix socket (harness.feed): random ones while it warms up,
   training rows once it says that training started, and stamps that moment with its own clock;
3. takes its checkpoint when the last byte of it arrives, which stops the clock, stores it where the
   sandbox cannot reach, and ends the trainer there and then: nothing it could do afterwards counts;
4. enforces the limits as they run out (start-up, budget), not after the fact;
5. scores the checkpoint with probes and audits (harness.scoring): the first model process, given the
   checkpoint, rebuilds the model from the commit's train.py and answers the rows; once it has been
   ended, the second, which has been shown nothing, answers the probes' copies;
6. writes what it observed: the outcome, the lab's clock, the tokens served, the score.

Where the lab asks, it also starts the trainer's compile cache from a snapshot of an earlier run, and
copies this run's as its START arrives (lab.compile_cache says under which rules).

No code of train.py ever runs beside other code of train.py: the trainer, the first model process
and the second run one after another, in sandboxes that share nothing writable, so none can hand
another what it saw. Nothing the trainer writes is taken as a measurement; its exit code only names
a failure.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from autoresearch.harness import run as harness_run
from autoresearch.harness import wire
from autoresearch.harness.storage import atomic_path, write_json

from . import compile_cache, devices, sandbox
from .outcomes import Failure

SPEC_FILE = "spec.json"
RESULT_FILE = "result.json"
LOG_FILE = "train.log"
SUPERVISOR_LOG = "supervisor.log"  # the supervisor's own output, beside the trial's train.log
CHECKPOINT_FILE = "checkpoint.pt"
SANDBOX_DIR = "sandbox"  # the sandboxes' folders; removed at the end, but for what the trainer wrote
HANDIN_DIR = "handin"  # under SANDBOX_DIR: the checkpoint, as the model processes see it (read-only)
LOG_LIMIT = 64 << 20  # bytes of output kept in train.log
MAX_CHECKPOINT = 16 << 30  # bytes: a checkpoint is held in memory when it arrives
# The model processes start beside the trainer but are needed only after its hand-in: they yield the CPU
# to it (on a 2-core machine its start-up took 2.8 s beside them at equal priority).
MODEL_NICENESS = 10
TRIAL_ENV = "AUTORESEARCH_TRIAL"  # token/sandbox: an unsandboxed trial's processes carry it, so strays can be found
# What a standby trainer imports before its trial is known (harness.run --standby), by whether it is on CUDA:
# torch, the compiler that torch.optim and torch.compile import (5.9 s and 4.0 s of an H100 host's start-up),
# and on CUDA the harness's kernels that the template imports, with cuDNN's frontend and Triton.
STANDBY_MODULES = {False: ("torch", "torch._dynamo"),
                   True: ("torch", "torch._dynamo", "torch._inductor", *harness_run.CUDA_KERNEL_MODULES)}
PER_TRIAL = ("trainer", "seed", "token", "compile_cache_from", "compile_cache_to")  # a standby is made without them
STANDBY_READY_S = 120.0  # a standby not done importing by then is taken for hung and replaced


@dataclass
class TrialSpec:
    """What the lab asks of one trial. Paths are the host's."""

    trainer: str  # the commit's train.py, in the lab's hands
    data: str  # the prepared data folder
    profile: dict  # the Profile's fields
    time_budget: float
    device: str = "cpu"  # cuda or cpu
    seed: int | None = None
    gpus: list[int] | None = None  # CUDA_VISIBLE_DEVICES for this trial
    threads: int | None = None  # CPU threads for this trial (OMP_NUM_THREADS)
    world_size: int = 1  # processes of a data-parallel trainer (torchrun)
    sandboxed: bool = True
    memory_bytes: int | None = None
    max_processes: int | None = sandbox.DEFAULT_MAX_PROCESSES
    startup_limit: float = 300.0  # seconds from launch to training_started()
    training_tolerance: float = 0.05  # how far past the budget the lab's clock may find training
    scoring_limit: float = 600.0  # seconds to rebuild and score the model, from the hand-in
    split: str = "val"
    checkpoint: str | None = None  # score this checkpoint instead of training (e.g. on the test split)
    hidden: list[str] = field(default_factory=list)  # host folders that must stay out of sight
    token: str = ""  # carried by an unsandboxed trial's processes
    compile_cache_from: str | None = None  # a snapshot's files, copied into the trainer's cache before it starts
    compile_cache_to: str | None = None  # where to copy the trainer's cache as its START arrives (lab.compile_cache)

    @property
    def allowed_training(self) -> float:
        return self.time_budget * (1 + self.training_tolerance) + 0.5


@dataclass
class Clock:
    """The lab's observations, on its monotonic clock, in seconds from the supervisor's start."""

    launched: float | None = None
    first_request: float | None = None
    started: float | None = None
    checkpoint: float | None = None
    trainer_exit: float | None = None
    scoring_started: float | None = None
    scoring_ended: float | None = None


class Stopped(Exception):
    """The lab asked this trial to stop (Ctrl-C)."""


class Crash(Exception):
    def __init__(self, failure: Failure, reason: str):
        super().__init__(reason)
        self.failure, self.reason = failure, reason


class ModelProcess:
    """The model to be scored, in a scoring sandbox of its own, started before it is needed.

    Until `load()` the process runs harness code only (it imports torch and waits): the sandbox can
    be made while the trainer starts up and no code of train.py runs. `load()` hands it the checkpoint;
    only then does it import train.py and rebuild the model."""

    def __init__(self, supervisor: "Supervisor", name: str):
        self.supervisor = supervisor
        work, tmp = supervisor._folder(name), supervisor._folder(f"{name}-tmp")
        self.work = work  # train.py is put here once the trial is known (a standby starts before)
        sock_dir = supervisor._socket_dir()
        self.box = supervisor._sandbox_spec(name, work, tmp, sock_dir, {"/checkpoint": supervisor.handin})
        self.box.nice = MODEL_NICENESS
        self.server = supervisor._listen(sock_dir)
        self.conn: socket.socket | None = None  # taken early by connected()
        profile = supervisor.spec.profile
        argv = [sys.executable, "-m", "autoresearch.harness.model_server", "train.py", supervisor.spec.device,
                str(profile["seq_len"]), str(profile["vocab_size"])]
        self.proc = supervisor._start(self.box, argv)

    def load(self, deadline: float):
        """Give it the checkpoint and wait until the model is rebuilt: (RemoteModel, its READY fields)."""
        from autoresearch.harness.scoring import RemoteModel

        supervisor = self.supervisor
        try:
            conn, self.conn = self.conn, None
            while conn is None:
                if supervisor.stop.is_set():
                    raise Stopped()
                if self.proc.poll() is not None:
                    raise Crash(Failure.SCORING, f"the scoring process exited with code {self.proc.returncode} "
                                                 f"before it connected: {supervisor._last_line()}")
                if time.monotonic() > deadline:
                    raise Crash(Failure.SCORING, "the scoring process did not connect within "
                                                 f"{supervisor.spec.scoring_limit:g} s")
                try:
                    conn, _ = self.server.accept()
                except TimeoutError:
                    continue
        finally:
            self.server.close()
        conn.settimeout(max(1.0, deadline - time.monotonic()))
        hello = wire.receive(conn, max_payload=0)
        if hello is None or hello.kind != wire.Kind.HELLO or hello.fields.get("key") != supervisor.key:
            raise Crash(Failure.SCORING, "a process without the trial's key connected to the scorer")
        wire.send(conn, wire.Kind.LOAD, checkpoint=self.box.where(f"/checkpoint/{CHECKPOINT_FILE}"))
        ready = wire.receive(conn, max_payload=0)
        if ready is None or ready.kind != wire.Kind.READY:
            why = ready.fields.get("message") if ready is not None and ready.kind == wire.Kind.ERROR else None
            raise Crash(Failure.SCORING, f"the model could not be rebuilt from the checkpoint: {why or 'its process ended'}")
        profile = supervisor.spec.profile
        return RemoteModel(conn, profile["seq_len"], profile["vocab_size"]), ready.fields

    def connected(self) -> bool:
        """Whether the process has connected (its imports are done); the connection is kept for load()."""
        if self.conn is None:
            try:
                self.server.settimeout(0.0)
                self.conn, _ = self.server.accept()
            except (BlockingIOError, OSError):
                pass
            finally:
                self.server.settimeout(0.2)
        return self.conn is not None

    def end(self) -> None:
        self.server.close()
        if self.conn is not None:
            self.conn.close()
        self.supervisor._end(self.proc)


class Supervisor:
    def __init__(self, trial_dir: Path, spec: TrialSpec):
        self.dir, self.spec = trial_dir, spec
        self.root = trial_dir / SANDBOX_DIR
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.clock = Clock()
        self.stats: dict = {}
        self.checkpoint: dict | None = None
        self.checkpoint_event = threading.Event()
        self.result: dict = {"sandboxed": spec.sandboxed}
        self.key = secrets.token_hex(16)  # what a process must present to be served: the sandbox's env holds it
        self.socket_dirs: list[Path] = []
        self.processes: list[subprocess.Popen] = []
        self.tags: dict[int, str | None] = {}  # pid -> what its sandbox's processes carry in TRIAL_ENV
        self.pipes: list[threading.Thread] = []
        self.log = open(trial_dir / LOG_FILE, "ab")
        self.log_bytes = 0
        self.log_lock = threading.Lock()
        self.handin = self._folder(HANDIN_DIR)
        self.models: tuple[ModelProcess, ModelProcess] | None = None
        self.trainer: tuple[subprocess.Popen, socket.socket, sandbox.Spec] | None = None
        self.feed = None  # (Feed, bos_id), made by _prepare_feed

    def since(self, moment: float | None) -> float | None:
        return None if moment is None else round(moment - self.t0, 3)

    # --- folders, sandboxes, processes ----------------------------------------------------------
    def _folder(self, name: str) -> Path:
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def _sandbox_spec(self, name: str, work: Path, tmp: Path, sock_dir: Path, readable: dict | None = None) -> sandbox.Spec:
        env = {wire.SOCKET_ENV: "/lab/lab.sock", wire.KEY_ENV: self.key}
        minors = None
        if self.spec.gpus is not None:
            # Only the slot's GPUs are bound into the sandbox, so they are named by UUID: CUDA's own
            # numbering would depend on which device nodes it can open.
            found = {g.index: g for g in devices.gpus()}
            chosen = [found.get(i) for i in self.spec.gpus]
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # the order lab.devices numbers them in
            env["CUDA_VISIBLE_DEVICES"] = ",".join(g.uuid if g and g.uuid else str(i)
                                                   for g, i in zip(chosen, self.spec.gpus))
            if all(g is not None and g.minor is not None and g.uuid for g in chosen):
                minors = tuple(g.minor for g in chosen)
        if self.spec.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.spec.threads)
        if self.spec.token:
            env[TRIAL_ENV] = f"{self.spec.token}/{name}"
        limits = sandbox.Limits.default() if self.spec.memory_bytes is None else sandbox.Limits(self.spec.memory_bytes)
        limits.max_processes = self.spec.max_processes
        return sandbox.Spec(cwd="/trial", writable={"/trial": work, "/tmp": tmp}, readable={"/lab": sock_dir, **(readable or {})},
                            env=env, gpus=self.spec.device == "cuda", gpu_minors=minors, limits=limits,
                            sandboxed=self.spec.sandboxed,
                            hidden=tuple(Path(p) for p in self.spec.hidden))

    def _socket_dir(self) -> Path:
        """A short-named folder for a Unix socket (their paths are limited to about 100 bytes), removed at
        the end. Anyone on the host who finds it must still present the trial's key."""
        path = Path(tempfile.mkdtemp(prefix="autoresearch-"))
        self.socket_dirs.append(path)
        return path

    def _listen(self, sock_dir: Path) -> socket.socket:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = sock_dir / "lab.sock"
        server.bind(str(path))
        os.chmod(path, 0o777)  # the sandbox's own uid connects to it
        os.chmod(sock_dir, 0o711)
        server.listen(16)
        server.settimeout(0.2)
        return server

    def _start(self, box: sandbox.Spec, argv: list[str], stdin=subprocess.DEVNULL) -> subprocess.Popen:
        """Start `argv` in `box`, its output piped into train.log."""
        proc = sandbox.start(box, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=stdin)
        self.processes.append(proc)
        self.tags[proc.pid] = box.env.get(TRIAL_ENV)
        piper = threading.Thread(target=self._pipe_log, args=(proc.stdout,), daemon=True)
        piper.start()
        self.pipes.append(piper)
        return proc

    def _pipe_log(self, stream) -> None:
        """Copy a sandbox's output into train.log; all of them together up to LOG_LIMIT bytes."""
        while chunk := stream.read1(1 << 16):
            with self.log_lock:
                if self.log_bytes < LOG_LIMIT:
                    keep = chunk[:LOG_LIMIT - self.log_bytes]
                    self.log.write(keep)
                    self.log_bytes += len(keep)
                    if self.log_bytes >= LOG_LIMIT:
                        self.log.write(b"\n[autoresearch: the log reached its limit; the rest of the output is dropped]\n")
                    self.log.flush()

    def _note(self, text: str) -> None:
        with self.log_lock:
            self.log.write(f"\n[autoresearch: {text}]\n".encode())
            self.log.flush()

    def _end(self, proc: subprocess.Popen | None) -> None:
        """Kill a sandbox: its first process's group, and with it (the PID namespace) everything it started."""
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if not self.spec.sandboxed and self.tags.get(proc.pid):  # no PID namespace: find what left the group
            from .processes import kill_tagged

            kill_tagged(TRIAL_ENV, self.tags[proc.pid])

    def _last_line(self) -> str:
        try:
            with open(self.dir / LOG_FILE, "rb") as f:
                f.seek(max(0, self.log_bytes - 8192))
                lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        lines = [line for line in lines if not line.startswith("[autoresearch:")]
        return lines[-1][:300] if lines else ""

    # --- training -------------------------------------------------------------------------------
    def _start_trainer(self, standby: bool = False) -> tuple[subprocess.Popen, socket.socket, sandbox.Spec]:
        """The trainer's sandbox, started at once; in a standby, importing STANDBY_MODULES until go()."""
        from autoresearch.harness.tokenizer import META_FILE, RANKS_FILE

        work, tmp, tok_dir = (self._folder(n) for n in ("train", "train-tmp", "tokenizer"))
        sock_dir = self._socket_dir()
        if not standby:
            shutil.copyfile(self.spec.trainer, work / "train.py")
        for name in (RANKS_FILE, META_FILE):
            shutil.copyfile(Path(self.spec.data) / name, tok_dir / name)
        box = self._sandbox_spec("train", work, tmp, sock_dir, {"/autoresearch/tokenizer": tok_dir})
        cache = box.where(f"/tmp/{compile_cache.TRAINER_CACHE}")  # Inductor's and Triton's, where the lab finds it
        box.env.update(TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=f"{cache}/triton")
        if not standby:
            self._seed_compile_cache()
        server = self._listen(sock_dir)
        ranks = self.spec.world_size
        # Several ranks run under torchrun, in this one sandbox (its rendezvous on the sandbox's own loopback),
        # through the harness's launcher: the first rank to fail ends them all, and its exit code and last line
        # are the trial's.
        launch = [f"{harness_run.NPROC_FLAG}{ranks}"] if ranks > 1 else []
        if standby:
            launch = [harness_run.STANDBY_FLAG + ",".join(STANDBY_MODULES[self.spec.device == "cuda"])]
        argv = [sys.executable, "-m", "autoresearch.harness.run", *launch, "train.py"]
        if box.limits.memory_bytes:  # the trial's memory, shared among its ranks (the limit is per process)
            box.limits.memory_bytes //= ranks
        self.result["world_size"] = ranks
        proc = self._start(box, argv, stdin=subprocess.PIPE if standby else subprocess.DEVNULL)
        if not standby:
            self.clock.launched = time.monotonic()
        return proc, server, box

    def _standby_ready(self, proc: subprocess.Popen) -> bool:
        """Whether a standby's processes are done importing: the trainer has left its mark (or ended), and
        both model processes have connected. Its trial's training starts only then, so that on a CPU their
        imports do not take the cores from the budget's time."""
        return ((proc.poll() is not None or (self.root / "train-tmp" / harness_run.READY_FILE).exists())
                and all(m.connected() or m.proc.poll() is not None for m in self.models))

    def _hand_script(self) -> None:
        """train.py into the model processes' folders, and into a standby trainer's, which, once it is
        ready, is told to go. One that ended before its trial, or is not ready within STANDBY_READY_S, is
        replaced by a fresh trainer."""
        for model in self.models:
            shutil.copyfile(self.spec.trainer, model.work / "train.py")
        proc = self.trainer[0] if self.trainer else None
        if proc is not None and proc.stdin is not None:
            waited = time.monotonic()
            while not (ready := self._standby_ready(proc)) and time.monotonic() - waited < STANDBY_READY_S:
                if self.stop.is_set():
                    raise Stopped()
                time.sleep(0.02)
            (self.root / "train-tmp" / harness_run.READY_FILE).unlink(missing_ok=True)
            self.result["standby_wait_seconds"] = round(time.monotonic() - waited, 3)
            if proc.poll() is not None or not ready:
                how = f"had ended (exit {proc.returncode})" if proc.poll() is not None else \
                    f"was not ready after {STANDBY_READY_S:g} s"
                self._note(f"the standby trainer {how} before its trial; a fresh one is started")
                self._end(proc)
                self.trainer[1].close()
                self.trainer = self._start_trainer()
                return
            shutil.copyfile(self.spec.trainer, self.root / "train" / "train.py")
            self._seed_compile_cache()
            try:
                proc.stdin.write(harness_run.GO.encode() + b"\n")
                proc.stdin.close()
            except OSError:  # it ended just now: its exit is the trial's failure, which _watch reports
                pass
            self.clock.launched = time.monotonic()

    def _seed_compile_cache(self) -> None:
        """The snapshot the lab gives this run, copied into the trainer's cache folder (none: it starts empty)."""
        if not self.spec.compile_cache_from:
            return
        into = self.root / "train-tmp" / compile_cache.TRAINER_CACHE
        shutil.rmtree(into, ignore_errors=True)
        began = time.monotonic()
        tmp = into.parent.stat()  # a standby's sandbox owns its /tmp already; a fresh one is given it as it starts
        try:
            size, files = compile_cache.copy_files(Path(self.spec.compile_cache_from), into, owner=(tmp.st_uid, tmp.st_gid))
            seeded = {"bytes": size, "files": files}
        except Exception as e:  # noqa: BLE001 - it compiles from nothing, as a first run does
            shutil.rmtree(into, ignore_errors=True)
            seeded = {"failed": str(e)[:300]}
        self.result.setdefault("compile_cache", {})["seeded"] = {**seeded, "seconds": round(time.monotonic() - began, 3)}

    def _snapshot_compile_cache(self) -> None:
        """Copy the trainer's cache folder as its START arrives (the feed serves nothing meanwhile)."""
        began = time.monotonic()
        source = self.root / "train-tmp" / compile_cache.TRAINER_CACHE
        dest = Path(self.spec.compile_cache_to) / compile_cache.FILES
        try:
            shutil.rmtree(dest.parent, ignore_errors=True)
            dest.parent.mkdir(parents=True)
            size, files = compile_cache.copy_files(source, dest) if source.is_dir() else (0, 0)
            made = {"bytes": size, "files": files}
        except Exception as e:  # noqa: BLE001 - whatever the trainer left there, its training goes on
            shutil.rmtree(dest.parent, ignore_errors=True)
            made = {"refused": str(e)[:300]}
        self.result.setdefault("compile_cache", {})["snapshot"] = {**made, "seconds": round(time.monotonic() - began, 3)}

    def _prepare_feed(self):
        """The training rows, ready to be served (a standby makes them before its trial)."""
        from autoresearch.harness.dataset import PreparedData
        from autoresearch.harness.feed import Feed
        from autoresearch.harness.profiles import Profile

        if self.feed is None:
            profile = Profile(**self.spec.profile)
            data = PreparedData.open(Path(self.spec.data), profile)
            self.feed = Feed(data.tokens("train"), data.doc_starts("train"), profile.seq_len, data.tokenizer.bos_id,
                             profile.vocab_size, self.spec.world_size), data.tokenizer.bos_id
        return self.feed

    def train(self) -> None:
        from autoresearch.harness.feed import serve_trainer

        proc, server, box = self.trainer
        try:
            # While train.py starts up (imports, compilation), the rows get ready: it asks for none before.
            feed, bos_id = self._prepare_feed()
            if self.spec.compile_cache_to:
                feed.before_start = self._snapshot_compile_cache
            settings = {"profile": self.spec.profile, "time_budget": self.spec.time_budget, "bos_id": bos_id,
                        "seed": self.spec.seed, "device": self.spec.device,
                        "tokenizer": box.where("/autoresearch/tokenizer")}

            def on_checkpoint(payload: bytes, stats: dict, arrived: float) -> None:
                self.clock.checkpoint = arrived
                path = self.dir / CHECKPOINT_FILE
                with atomic_path(path) as part:
                    part.write_bytes(payload)
                os.link(path, self.handin / CHECKPOINT_FILE)
                self.checkpoint = {"path": str(path), "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
                self.stats = stats
                self.checkpoint_event.set()

            def talk(conn) -> None:
                try:
                    serve_trainer(conn, feed, settings, on_checkpoint, key=self.key, max_checkpoint=MAX_CHECKPOINT)
                except (OSError, wire.WireError):
                    pass
                finally:
                    conn.close()

            def accept() -> None:
                while not self.stop.is_set() and not self.checkpoint_event.is_set():
                    try:
                        conn, _ = server.accept()
                    except TimeoutError:
                        continue
                    except OSError:
                        return
                    conn.settimeout(None)
                    threading.Thread(target=talk, args=(conn,), daemon=True).start()

            threading.Thread(target=accept, daemon=True).start()
            self._watch(proc, feed)
        finally:
            self._end(proc)
            self.clock.trainer_exit = self.clock.trainer_exit or time.monotonic()
            server.close()
        self.result["tokens_served"] = feed.tokens_served
        self.result["requests"] = feed.requests

    def _watch(self, proc: subprocess.Popen, feed) -> None:
        """Wait for the hand-in, ending the trainer the moment it arrives or a limit runs out."""
        spec = self.spec
        while True:
            if self.stop.is_set():
                raise Stopped()
            now = time.monotonic()
            self.clock.first_request = feed.first_request_at
            self.clock.started = feed.started_at
            if self.checkpoint_event.is_set():  # the clock has stopped: nothing the trainer does now counts
                self._end(proc)
                self.clock.trainer_exit = time.monotonic()
                return
            code = proc.poll()
            if code is not None:
                self.clock.trainer_exit = now
                for piper in self.pipes:
                    piper.join(timeout=2)  # its last words, for the reason
                if self.checkpoint_event.is_set():
                    continue
                if code != 0:
                    raise Crash(*self._exit_failure(code))
                if feed.first_request_at is None:
                    raise Crash(Failure.NO_DATA, "no data: train.py never drew a batch from run.train_loader(...)")
                raise Crash(Failure.NO_CHECKPOINT, "train.py exited without handing in a checkpoint: it must end "
                                                   "with run.save_checkpoint(model, config)")
            if feed.started_at is None and now - self.clock.launched > spec.startup_limit:
                raise Crash(Failure.STARTUP_TIMEOUT,
                            f"train.py did not call run.training_started() within {spec.startup_limit:g} s of starting "
                            "(imports, model build, compilation and warm-up); it was ended")
            if feed.started_at is not None and now - feed.started_at > spec.allowed_training:
                raise Crash(Failure.OVER_BUDGET,
                            f"over budget: {now - feed.started_at:.1f} s since run.training_started() by the lab's clock and "
                            f"no checkpoint yet, past the {spec.time_budget:g} s budget (+{spec.training_tolerance:.0%}); "
                            "train.py was ended. The budget runs from run.training_started() to the last byte of "
                            "run.save_checkpoint(...)")
            self.checkpoint_event.wait(0.02)

    def _exit_failure(self, code: int) -> tuple[Failure, str]:
        kinds = {harness_run.EXIT_OOM: Failure.OOM, harness_run.EXIT_DIVERGED: Failure.DIVERGED,
                 harness_run.EXIT_IMPORT: Failure.IMPORT}
        failure = kinds.get(code, Failure.EXIT)
        last = self._last_line()
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return failure, f"train.py {how}" + (f": {last}" if last else "")

    def check_clock(self) -> float:
        started, ended = self.clock.started, self.clock.checkpoint
        if started is None:
            raise Crash(Failure.NO_DATA, "train.py handed in a checkpoint before calling run.training_started(): "
                                         "it trained on no training data")
        training = ended - started
        if training > self.spec.allowed_training:
            raise Crash(Failure.OVER_BUDGET,
                        f"over budget: trained {training:.1f} s by the lab's clock, over the {self.spec.time_budget:g} s "
                        f"budget (+{self.spec.training_tolerance:.0%}); the budget runs from run.training_started() "
                        "to the last byte of run.save_checkpoint(...)")
        return training

    # --- scoring --------------------------------------------------------------------------------
    def score(self, models: tuple[ModelProcess, ModelProcess]) -> dict:
        """Score the handed-in checkpoint on the spec's split. The rows go to the first model process; the
        probes' copies go to the second, given the checkpoint only once the first has been ended, which has
        been shown nothing else: a model that remembered its first answers cannot replay them
        (harness.scoring says why that matters)."""
        from autoresearch.harness import scoring
        from autoresearch.harness.dataset import PreparedData
        from autoresearch.harness.loader import eval_rows
        from autoresearch.harness.profiles import Profile

        first, second = models
        self.clock.scoring_started = time.monotonic()
        deadline = self.clock.scoring_started + self.spec.scoring_limit
        profile = Profile(**self.spec.profile)
        data = PreparedData.open(Path(self.spec.data), profile)
        if not data.has_split(self.spec.split):
            raise Crash(Failure.SCORING, f"the prepared data has no {self.spec.split} split to score on")
        rows = eval_rows(data.tokens(self.spec.split), data.doc_starts(self.spec.split), profile.seq_len,
                         data.tokenizer.bos_id, profile.eval_rows)

        class Fresh:
            """The second model process, loaded on first use, after the first has been ended."""

            remote = None

            def _ready(self):
                if self.remote is None:
                    first.end()
                    marks["rows"] = time.monotonic()
                    self.remote = second.load(deadline)[0]
                    marks["fresh_load"] = time.monotonic()
                return self.remote

            def answer(self, tokens):
                return self._ready().answer(tokens)

            def vectors(self, picks):
                return self._ready().vectors(picks)

        self._note(f"scoring the checkpoint on the {self.spec.split} split")
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), lambda: [m.end() for m in models])
        watchdog.start()
        marks = {"start": self.clock.scoring_started}  # when each part of the scoring ended
        try:
            model, ready = first.load(deadline)
            marks["load"] = time.monotonic()
            batch = scoring.eval_batch_size(self.spec.device, profile.seq_len, profile.vocab_size)
            scorer = scoring.Scorer(rows, data.tokenizer.token_bytes(), batch,
                                    scoring.TOLERANCE.get(self.spec.device, 1e-3))
            result = scorer.score(model, fresh_model=Fresh())
        except scoring.ModelMisbehaved as e:
            raise Crash(Failure.CAUSALITY, f"causality violation: {e}") from None
        except (scoring.HarnessError, wire.WireError, OSError) as e:
            if self.stop.is_set():
                raise Stopped() from None
            if time.monotonic() > deadline:
                raise Crash(Failure.SCORING, f"scoring did not finish within {self.spec.scoring_limit:g} s") from None
            raise Crash(Failure.SCORING, f"the model could not be scored: {e}") from None
        finally:
            watchdog.cancel()
            for m in models:
                m.end()
        self.clock.scoring_ended = marks["copies"] = time.monotonic()
        ends = list(marks.items())
        result.seconds = {name: round(end - previous, 3) for (_, previous), (name, end) in zip(ends, ends[1:])}
        return {**result.to_dict(), "params": ready.get("params"), "split": self.spec.split}

    # --- the whole trial ------------------------------------------------------------------------
    def start(self, standby: bool = False) -> None:
        """The trial's sandboxes: the two model processes, and the trainer unless a checkpoint is only
        scored. A standby starts them before its trial is known (take() names it)."""
        self.models = (ModelProcess(self, "score"), ModelProcess(self, "score-fresh"))
        self.trainer = None if self.spec.checkpoint else self._start_trainer(standby)
        if standby:
            self._prepare_feed()

    def take(self, trial_dir: Path, spec: TrialSpec) -> None:
        """A standby's trial: from here on its folder gets the log, the checkpoint and the result, and its
        clock starts now. The sandboxes stay where they were made, in the standby's folder."""
        if standby_key(asdict(spec)) != standby_key(asdict(self.spec)):
            raise ValueError("the trial's spec differs from the standby's beyond what is the trial's own")
        staged = (self.dir / LOG_FILE).read_bytes()  # what the sandboxes said while they waited, if anything
        with self.log_lock:
            self.log.close()
            self.log = open(trial_dir / LOG_FILE, "ab")
            self.log.write(staged)
            self.log.flush()
        self.dir, self.spec, self.t0 = trial_dir, spec, time.monotonic()
        self.result["standby"] = True

    def discard(self) -> None:
        """A standby whose trial never came: its sandboxes ended, its folder removed."""
        for proc in self.processes:
            self._end(proc)
        self.log.close()
        for path in [self.dir, *self.socket_dirs]:
            shutil.rmtree(path, ignore_errors=True)

    def run(self) -> dict:
        try:
            if self.models is None:
                self.start()
            self._hand_script()
            if self.spec.checkpoint:
                try:
                    os.link(self.spec.checkpoint, self.handin / CHECKPOINT_FILE)
                except OSError:  # another filesystem
                    shutil.copyfile(self.spec.checkpoint, self.handin / CHECKPOINT_FILE)
            else:
                self.train()
                training = self.check_clock()
                self.result.update(training_seconds=training, checkpoint=self.checkpoint, stats=self.stats,
                                   tokens_per_second=self.result["tokens_served"] / training if training > 0 else None)
            score = self.score(self.models)
            self.result.update(outcome="ok", val_bpb=score["bpb"], score=score)
        except Crash as e:
            self.result.update(outcome="crash", failure=e.failure.value, reason=e.reason)
        except Stopped:
            self.result.update(outcome="stopped", reason="stopped: the lab was told to stop during this trial")
        except sandbox.SandboxUnavailable as e:
            self.result.update(outcome="crash", failure=Failure.SANDBOX.value, reason=f"sandbox: {e}")
        finally:
            for proc in self.processes:
                self._end(proc)
            for piper in self.pipes:
                piper.join(timeout=2)
            self.log.close()
        self.result["clock"] = {k: self.since(v) for k, v in asdict(self.clock).items()}
        self.result["total_seconds"] = round(time.monotonic() - self.t0, 3)
        for name in ("train-tmp", "score", "score-tmp", "score-fresh", "score-fresh-tmp", "tokenizer", HANDIN_DIR):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for path in self.socket_dirs:
            shutil.rmtree(path, ignore_errors=True)
        kept = self.dir / SANDBOX_DIR
        if self.root != kept:  # a standby's: what the trainer wrote goes to its trial, the rest is removed
            kept.mkdir(exist_ok=True)
            if (self.root / "train").is_dir():
                shutil.rmtree(kept / "train", ignore_errors=True)
                os.replace(self.root / "train", kept / "train")
            shutil.rmtree(self.root.parent, ignore_errors=True)
        return self.result


def _stopped_by_signals(supervisor: Supervisor) -> Supervisor:
    """SIGTERM and SIGINT (the lab's stop, Ctrl-C) end `supervisor`'s trial as stopped."""
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stop.set())
    signal.signal(signal.SIGINT, lambda *_: supervisor.stop.set())
    return supervisor


def standby_key(spec: dict) -> dict:
    """What a standby's sandboxes were made for: a trial's spec but for what is the trial's own (PER_TRIAL)."""
    return {k: v for k, v in spec.items() if k not in PER_TRIAL}


def can_stand_by(spec: dict) -> bool:
    """Whether a trial of `spec` can run in a standby: sandboxed, one process, trained (not only scored)."""
    return bool(spec.get("sandboxed")) and spec.get("world_size", 1) == 1 and not spec.get("checkpoint")


def stand_by(staging: Path) -> int:
    """The sandboxes of a trial made from staging/spec.json before the trial is known, the trainer's
    imports done while they wait; then the trial folder read from standard input is the trial they run
    (its spec may differ only in the trainer, the seed and the token). At the end of the input, exit."""
    template = TrialSpec(**json.loads((staging / SPEC_FILE).read_text()))
    supervisor = _stopped_by_signals(Supervisor(staging, template))
    supervisor.start(standby=True)
    line = sys.stdin.readline().strip()
    if not line or supervisor.stop.is_set():
        supervisor.discard()
        return 0
    trial_dir = Path(line)
    log = os.open(trial_dir / SUPERVISOR_LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)  # this process's own output goes to its trial from here on
    os.dup2(log, 2)
    os.close(log)
    supervisor.take(trial_dir, TrialSpec(**json.loads((trial_dir / SPEC_FILE).read_text())))
    write_json(trial_dir / RESULT_FILE, supervisor.run())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) == 2 and args[0] == "--standby":
        return stand_by(Path(args[1]))
    if len(args) != 1:
        print("usage: python -m autoresearch.lab.supervisor TRIAL_DIR\n"
              "       python -m autoresearch.lab.supervisor --standby STAGING_DIR   (then TRIAL_DIR on stdin)",
              file=sys.stderr)
        return 2
    trial_dir = Path(args[0])
    spec = TrialSpec(**json.loads((trial_dir / SPEC_FILE).read_text()))
    supervisor = _stopped_by_signals(Supervisor(trial_dir, spec))
    write_json(trial_dir / RESULT_FILE, supervisor.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
