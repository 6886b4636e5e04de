"""One trial: run train.py under the lab's clock and limits, then score its checkpoint.

The trainer runs in its own process group with the workspace as working directory, its output in
a log file, no secrets in its environment, and a hard wall-clock limit after which the whole group
is killed. The lab times training itself (see harness.session), checks that nothing outside the
trial's own folder was touched, and has the checkpoint scored by the harness in a fresh process.
What train.py prints is kept for information; the harness's number decides.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .limits import evaluation_limit
from .processes import kill_tagged
from .workspace import LAB_DIR, READER_PATHS, Workspace, WorkspaceError

SECRET_NAME = re.compile(r"(_API_KEY|_TOKEN|_SECRET|_PASSWORD)$|^(AWS_|ANTHROPIC_|OPENAI_)", re.IGNORECASE)
SUMMARY_KEYS = ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth")
LOG_TAIL_LINES = 40
TRIAL_ENV = "AUTORESEARCH_TRIAL"


@dataclass
class TrialOutcome:
    """What one run of a commit produced; `reason` is empty when it produced a valid val_bpb."""

    val_bpb: float | None = None
    reason: str = ""
    summary: dict = field(default_factory=dict)
    training_seconds: float | None = None  # the lab's clock
    total_seconds: float = 0.0
    hardware: dict = field(default_factory=dict)
    log_tail: str = ""

    @property
    def crashed(self) -> bool:
        return self.val_bpb is None


def without_secrets(environ) -> dict:
    """`environ` less the variables that look like credentials (API keys, tokens, cloud accounts)."""
    return {k: v for k, v in environ.items() if not SECRET_NAME.search(k)}


def trainer_env(ws: Workspace, out_dir: Path, seed: int | None, token: str) -> dict:
    env = without_secrets(os.environ)
    env.update({
        "AUTORESEARCH_PROFILE": ws.config["profile"],
        "AUTORESEARCH_DATA": ws.config["data"],
        "AUTORESEARCH_OUTPUT": str(out_dir),
        "AUTORESEARCH_TIME_BUDGET": repr(ws.time_budget),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        TRIAL_ENV: token,
    })
    env.pop("AUTORESEARCH_SEED", None)
    if seed is not None:
        env["AUTORESEARCH_SEED"] = str(seed)
    return env


def parse_summary(log: str) -> dict:
    """The `key: value` lines after the last `---` line of train.py's output."""
    lines = log.splitlines()
    last_rule = max((i for i, line in enumerate(lines) if line.strip() == "---"), default=None)
    summary = {}
    for line in lines[last_rule + 1 :] if last_rule is not None else []:
        key, colon, value = line.partition(":")
        if colon and key.strip() in SUMMARY_KEYS:
            try:
                summary[key.strip()] = float(value)
            except ValueError:
                pass
    return summary


def kill_trial_processes(token: str, pgid: int | None = None) -> int:
    """Kill the trainer's process group and whatever left it carrying the trial's token. Returns how
    many were found alive."""
    return kill_tagged(TRIAL_ENV, token, pgid)


def _lab_snapshot(ws: Workspace, own: Path) -> dict:
    """Size and mtime of the lab's files, but the trial's own folder and the ledger (whose content
    is compared separately: SQLite readers may touch its files legitimately)."""
    readers = [ws.lab_dir / name for name in READER_PATHS]
    snap = {}
    for path in ws.lab_dir.rglob("*"):
        if (path.is_file() and own not in path.parents and not path.name.startswith("ledger.db")
                and not any(r in path.parents for r in readers)):
            st = path.stat()
            snap[str(path.relative_to(ws.root))] = (st.st_size, st.st_mtime_ns)
    return snap


class EventClock(threading.Thread):
    """Reads the harness's events from the trainer and stamps them with the lab's own clock."""

    def __init__(self, fd: int):
        super().__init__(daemon=True)
        self.fd = fd
        self.times: dict[str, float] = {}

    def run(self) -> None:
        buffer = b""
        with os.fdopen(self.fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(4096):
                now = time.monotonic()
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self.times.setdefault(line.decode(errors="replace").strip(), now)


def run_trainer(ws: Workspace, out_dir: Path, seed: int | None, token: str, log_path: Path,
                stop: threading.Event | None = None) -> tuple[int | None, str, EventClock, float]:
    """Run train.py; returns (exit code or None if killed, why it was killed, clock, seconds)."""
    read_fd, write_fd = os.pipe()
    env = trainer_env(ws, out_dir, seed, token)
    env["AUTORESEARCH_EVENTS_FD"] = str(write_fd)
    clock = EventClock(read_fd)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "train.py"], cwd=ws.root, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, pass_fds=(write_fd,),
                                start_new_session=True, preexec_fn=_die_with_parent)
        os.close(write_fd)
        clock.start()
        killed = ""
        try:
            while proc.poll() is None:
                if time.monotonic() - started > ws.time_limit:
                    killed = f"timeout: still running after the {ws.time_limit:.0f}s limit (budget {ws.time_budget:g}s + grace)"
                elif stop is not None and stop.is_set():
                    killed = "interrupted"
                if killed:
                    kill_trial_processes(token, proc.pid)
                    proc.wait()
                    break
                time.sleep(0.05)
        except BaseException:
            kill_trial_processes(token, proc.pid)
            proc.wait()
            raise
    seconds = time.monotonic() - started
    clock.join(timeout=5)
    return (None if killed else proc.returncode), killed, clock, seconds


def _die_with_parent() -> None:
    """In the trainer's process, before exec: be killed if the lab dies (Linux), even by kill -9."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _crash_reason(code: int, tail: str) -> str:
    lowered = tail.lower()
    if "out of memory" in lowered or "outofmemoryerror" in lowered:
        kind = "OOM"
    elif "nan" in lowered and ("loss" in lowered or "diverg" in lowered):
        kind = "NaN"
    elif "syntaxerror" in lowered:
        kind = "syntax error"
    elif "importerror" in lowered or "modulenotfounderror" in lowered:
        kind = "import error"
    else:
        kind = "exit"
    last = next((line.strip() for line in reversed(tail.splitlines()) if line.strip()), "")
    return f"{kind}: train.py exited with code {code}" + (f": {last[:300]}" if last else "")


def check_training_time(ws: Workspace, clock: EventClock, ended: float) -> tuple[float | None, str]:
    """(training seconds on the lab's clock, a reason to reject or '')."""
    first = clock.times.get("first_batch")
    if first is None:
        return None, "no data: train.py never drew a batch from the harness loader (run.train_loader)"
    start = clock.times.get("training_started", first)
    end = clock.times.get("checkpoint", ended)
    warmup = start - first
    if warmup > ws.config["warmup_cap_seconds"]:
        return None, (f"over budget: warm-up took {warmup:.1f}s between the first batch and run.training_started(), over "
                      f"the {ws.config['warmup_cap_seconds']:g}s cap: training before the clock starts is not allowed")
    training = end - start
    allowed = ws.time_budget * (1 + ws.config["training_tolerance"]) + 0.5
    if training > allowed:
        return training, (f"over budget: trained {training:.1f}s by the lab's clock, over the {ws.time_budget:g}s budget "
                          f"(+{ws.config['training_tolerance']:.0%} tolerance); the budget is wall-clock time "
                          "from run.training_started() to run.save_checkpoint()")
    return training, ""


def score_checkpoint(trainer: Path, checkpoint: Path, result_path: Path, split: str, *, cwd: Path, env: dict,
                     timeout: float, tail_lines: int) -> dict:
    """The harness's score of `checkpoint`, from a fresh `python -m autoresearch.harness.evaluate`
    process, or {"error": ...} with the end of its output. Raises subprocess.TimeoutExpired."""
    cmd = [sys.executable, "-m", "autoresearch.harness.evaluate", str(trainer), str(checkpoint), str(result_path),
           "--split", split]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        return json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-tail_lines:]
        return {"error": f"the evaluation process failed (exit {proc.returncode}): {' | '.join(tail)}"}


def evaluate(ws: Workspace, out_dir: Path, token: str, split: str = "val") -> dict:
    """Score the checkpoint in a fresh harness process."""
    limit = evaluation_limit(ws.time_limit)
    try:
        return score_checkpoint(ws.root / "train.py", out_dir / "checkpoint.pt", out_dir / f"eval-{split}.json", split,
                                cwd=ws.root, env=trainer_env(ws, out_dir, None, token), timeout=limit, tail_lines=5)
    except subprocess.TimeoutExpired:
        return {"error": f"the evaluation did not finish in {limit:.0f}s (does build_model or the forward pass hang?)"}
    finally:
        kill_trial_processes(token)


def run_trial(ws: Workspace, trial_id: int, seed: int | None, ledger_content, stop: threading.Event | None = None) -> TrialOutcome:
    """Run the commit checked out in `ws` once and measure it. `ledger_content()` returns something
    that changes whenever the ledger's rows change, to catch a trainer that writes into it."""
    out_dir = ws.trial_dir(trial_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train.log"
    token = f"{ws.config['id']}:{trial_id}"
    head = ws.head()
    before_lab, before_ledger = _lab_snapshot(ws, out_dir), ledger_content()

    code, killed, clock, seconds = run_trainer(ws, out_dir, seed, token, log_path, stop)
    ended = time.monotonic()
    strays = kill_trial_processes(token)
    log = _read_log(log_path)
    tail = "\n".join(log.splitlines()[-LOG_TAIL_LINES:])
    outcome = TrialOutcome(total_seconds=seconds, log_tail=tail, summary=parse_summary(log))

    def crash(reason: str) -> TrialOutcome:
        outcome.reason = reason
        return outcome

    # Tampering first: a trainer that changed the harness must not have its checkpoint scored by it.
    try:
        ws.check_fingerprint()
    except WorkspaceError as e:
        return crash(f"tampering: the harness or its data changed during the run (train.py wrote to them, or "
                     f"autoresearch was reinstalled meanwhile). {e}")
    if ledger_content() != before_ledger:
        return crash(f"tampering: the ledger in {LAB_DIR}/ was written during the trial")
    after_lab = _lab_snapshot(ws, out_dir)
    touched = sorted(k for k in set(before_lab) | set(after_lab) if before_lab.get(k) != after_lab.get(k))
    if touched:
        return crash(f"tampering: the trial wrote into {LAB_DIR}/ outside its own folder: {', '.join(touched[:5])}")
    changed = ws.changed_files()
    if ws.head() != head or changed:
        return crash("tampering: the trial changed the git repository or its files "
                     f"({', '.join(changed[:5]) or 'HEAD moved'})")
    # Ignored files too: nothing a trainer leaves in the workspace (weights to resume from, say)
    # may reach the next trial.
    ws.clean()
    if killed:
        return crash(killed)
    if code != 0:
        return crash(_crash_reason(code, tail))
    if strays:
        return crash(f"stray processes: left {strays} process(es) running after it exited; they were killed")
    outcome.training_seconds, late = check_training_time(ws, clock, ended)
    if late:
        return crash(late)

    result = evaluate(ws, out_dir, token)
    outcome.hardware = result.get("hardware", {})
    if "error" in result:
        return crash(f"evaluation: {result['error']}")
    probe = result["causality"]
    if not probe["causal"]:
        return crash(f"causality violation: logits before position {probe['cut']} changed by "
                     f"{probe['max_relative_diff']:.2e} (tolerance {probe['tolerance']:.0e}) when later tokens "
                     "changed: the model reads tokens it is meant to predict")
    outcome.val_bpb = result["val_bpb"]
    return outcome
