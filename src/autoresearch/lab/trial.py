"""One trial, as the lab sees it: a commit in, a measurement (or a named failure) out.

The lab writes the commit's train.py and a spec into the trial's folder, checks that the script
compiles, and has an executor (lab.executor: this host, or a cluster's node) run the trial's
supervisor (lab.supervisor) in a process of its own, which runs the sandboxed trainer and scorer.
It takes the supervisor's result only if the supervisor exited 0 and wrote it during this trial; it
checks the lab's own files by content before and after; and it appends the reference's summary
block, with the lab's numbers, to the end of train.log.
"""
from __future__ import annotations

import json
import os
import threading
import traceback
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from autoresearch.harness.hardware import peak_flops
from autoresearch.harness.storage import cache_dir

from . import supervisor as sup
from .compile_cache import FOLDER as COMPILE_CACHE_FOLDER
from .compile_cache import CompileCache
from .executor import Executor, LocalExecutor, Slot
from .limits import SCORING_LIMIT, startup_limit, trial_limit
from .outcomes import Failure
from .processes import kill_tagged
from .workspace import Workspace, WorkspaceError

SUMMARY_KEYS = ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
                "total_tokens_M", "num_steps", "num_params_M", "depth")
SUMMARY_FORMATS = dict(val_bpb="{:.6f}", training_seconds="{:.1f}", total_seconds="{:.1f}", peak_vram_mb="{:.1f}",
                       mfu_percent="{:.2f}", total_tokens_M="{:.1f}", num_steps="{:.0f}", num_params_M="{:.1f}",
                       depth="{:.0f}")
LOG_TAIL_LINES = 40


@dataclass
class TrialOutcome:
    """What one run of a commit produced; `failure` is None when it produced a valid val_bpb."""

    val_bpb: float | None = None
    failure: Failure | None = None
    reason: str = ""
    stopped: bool = False  # no decision can come of it: it is run again
    lost: bool = False  # stopped because the slot's machine went away
    summary: dict = field(default_factory=dict)  # the nine keys, the lab's numbers where it has them
    stats: dict = field(default_factory=dict)  # what train.py reported, for information
    training_seconds: float | None = None  # the lab's clock
    total_seconds: float = 0.0
    tokens_per_second: float | None = None
    device_class: str | None = None
    hardware: dict = field(default_factory=dict)
    sandboxed: bool = True
    log_tail: str = ""
    result: dict = field(default_factory=dict)  # the supervisor's whole result

    @property
    def crashed(self) -> bool:
        return self.val_bpb is None and not self.stopped


def syntax_error(source: str) -> str | None:
    """The Python syntax error in `source`, as Python shows it (file, line, caret), or None."""
    try:
        compile(source, "train.py", "exec")
    except SyntaxError as e:
        return "".join(traceback.format_exception_only(type(e), e)).rstrip()
    return None


def summary_block(summary: dict) -> str:
    lines = ["---"]
    for key in SUMMARY_KEYS:
        value = summary.get(key)
        shown = SUMMARY_FORMATS[key].format(value) if isinstance(value, (int, float)) else "n/a"
        lines.append(f"{key + ':':<18}{shown}")
    return "\n".join(lines) + "\n"


def summarize(result: dict) -> dict:
    """The reference's nine summary keys, from what the lab measured and, for the rest, what the
    trainer reported."""
    stats = result.get("stats") or {}
    training = result.get("training_seconds")
    tokens = result.get("tokens_served")
    score = result.get("score") or {}
    flops = stats.get("flops_per_token")
    peak = peak_flops(stats.get("device_name")) * int(result.get("world_size", 1))
    mfu = None
    if isinstance(flops, (int, float)) and peak and training and tokens:
        mfu = 100 * flops * tokens / training / peak
    params = score.get("params")
    number = lambda v: v if isinstance(v, (int, float)) and not isinstance(v, bool) else None  # noqa: E731
    return {"val_bpb": result.get("val_bpb"), "training_seconds": training, "total_seconds": result.get("total_seconds"),
            "peak_vram_mb": number(stats.get("peak_memory_mb")), "mfu_percent": mfu,
            "total_tokens_M": tokens / 1e6 if tokens is not None else None, "num_steps": number(stats.get("num_steps")),
            "num_params_M": params / 1e6 if isinstance(params, int) else None, "depth": number(stats.get("depth"))}


def _read_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _note(log_path: Path, line: str) -> None:
    """A line of the lab's in a trial's log."""
    with open(log_path, "a") as log:
        log.write(f"\n[autoresearch: {line}]\n")


def compile_environment(ws: Workspace, slot: Slot) -> dict:
    """What a trial's compiled code depends on besides its train.py: its snapshots' key (lab.compile_cache)."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    fingerprint = ws.config.get("fingerprint", {})
    return {"autoresearch": fingerprint.get("version"), "harness": fingerprint.get("harness_sha256"),
            "torch": torch_version, "device_class": slot.device_class, "ranks": slot.ranks}


def trial_token(ws: Workspace, trial_id: int) -> str:
    return f"{ws.config['id']}:{trial_id}"


def kill_trial_processes(ws: Workspace, trial_id: int) -> int:
    """Kill what is left of a trial that a dead lab left behind (an unsandboxed one's processes carry
    its token; a sandboxed one's die with its supervisor)."""
    return kill_tagged(sup.TRIAL_ENV, trial_token(ws, trial_id))


def run_trial(ws: Workspace, trial_id: int, commit: str, seed: int | None, *, slot: Slot | None = None,
              sandboxed: bool = True, stop: threading.Event | None = None, checkpoint: Path | None = None,
              split: str = "val", folder: Path | None = None, executor: Executor | None = None) -> TrialOutcome:
    """Run `commit`'s train.py once and measure it (or, given `checkpoint`, only score that on `split`),
    in `slot` of `executor` (this host's, by default). The supervisor works in `folder`, by default the
    trial's own; scoring a kept checkpoint again (the sealed test) works elsewhere, so that the trial's
    record stays as it was."""
    slot = slot or Slot()
    trial_dir = Path(folder) if folder is not None else ws.trial_dir(trial_id)
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / sup.RESULT_FILE).unlink(missing_ok=True)
    if checkpoint is None:  # a stale checkpoint of this trial's; one given to be scored is never removed
        (trial_dir / sup.CHECKPOINT_FILE).unlink(missing_ok=True)
    log_path = trial_dir / sup.LOG_FILE
    outcome = TrialOutcome(sandboxed=sandboxed)
    source = ws.show(commit, "train.py")
    (trial_dir / "train.py").write_text(source)
    error = syntax_error(source)
    if error:
        log_path.write_text(error + "\n")
        outcome.failure, outcome.reason = Failure.SYNTAX, f"syntax error in train.py:\n{error}"
        outcome.log_tail = error
        return outcome
    before = ws.integrity()
    config = ws.config
    executor = executor or LocalExecutor(standby=False, compile_cache=False)
    cache = plan = None
    store = cache_dir() / COMPILE_CACHE_FOLDER
    if checkpoint is None and sandboxed and executor.keeps_compile_cache(slot):
        cache = CompileCache(store, compile_environment(ws, slot))
        try:
            base = config["base_commit"]
            own, baseline = ws.blob_ids([commit, base])
            plan = cache.plan((commit, own), (base, baseline), trial_id)
        except Exception as e:  # noqa: BLE001 - a store it cannot use: the run compiles from nothing
            cache = None
            _note(log_path, f"no compile cache for this run: {type(e).__name__}: {e}")
    spec = sup.TrialSpec(
        trainer=str(trial_dir / "train.py"), data=config["data"], profile=asdict(ws.profile), time_budget=ws.time_budget,
        device=slot.device, seed=seed, gpus=slot.gpus, threads=slot.threads, world_size=slot.ranks,
        sandboxed=sandboxed,
        memory_bytes=config.get("memory_bytes"), startup_limit=startup_limit(config),
        max_processes=int(config.get("max_processes") or sup.sandbox.DEFAULT_MAX_PROCESSES),
        training_tolerance=float(config.get("training_tolerance", 0.05)),
        scoring_limit=float(config.get("scoring_limit", SCORING_LIMIT)),
        split=split, checkpoint=str(checkpoint) if checkpoint else None,
        hidden=[str(ws.root), str(Path(config["data"])), str(Path.home()), str(store)],
        token=trial_token(ws, trial_id),
        compile_cache_from=str(plan.source) if plan and plan.source else None,
        compile_cache_to=str(plan.incoming) if plan and plan.incoming else None)
    (trial_dir / sup.SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2))
    limit = trial_limit(config, ws.time_budget)
    ran = executor.run(trial_dir, slot, limit, stop)
    outcome.total_seconds = ran.seconds
    result = {}
    if ran.returncode == 0:
        try:
            result = json.loads((trial_dir / sup.RESULT_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            result = {}
    outcome.result = result
    if cache is not None:
        try:
            note = cache.record(plan, result if result.get("outcome") == "ok" else {}, trial_id)
        except Exception as e:  # noqa: BLE001 - the trial's record comes first
            note = f"its compile cache was not kept: {type(e).__name__}: {e}"
        if result:  # none stays none: the trial failed
            result.setdefault("compile_cache", {}).update(given=plan.given, note=note)
        if note:
            _note(log_path, note)
    outcome.log_tail = _read_tail(log_path)
    if not result:
        if stop is not None and stop.is_set():
            outcome.stopped, outcome.reason = True, "stopped: the lab was told to stop during this trial"
        elif ran.lost:
            outcome.stopped = outcome.lost = True
            outcome.reason = f"lost: {ran.lost}; it is run again in another slot"
        else:
            tail = _read_tail(trial_dir / sup.SUPERVISOR_LOG, 5).replace("\n", " | ")
            outcome.failure = Failure.STARTUP_TIMEOUT if ran.timed_out else Failure.SANDBOX
            outcome.reason = (f"the trial's supervisor ended without a result (exit {ran.returncode}, after "
                              f"{outcome.total_seconds:.0f} s of a {limit:.0f} s limit): {tail}")
        return outcome
    outcome.sandboxed = bool(result.get("sandboxed", sandboxed))
    outcome.stats = result.get("stats") or {}
    outcome.training_seconds = result.get("training_seconds")
    outcome.tokens_per_second = result.get("tokens_per_second")
    outcome.device_class = slot.device_class
    outcome.hardware = {"device": slot.device, "class": outcome.device_class, "gpus": slot.gpus, "threads": slot.threads,
                        "world_size": slot.ranks, "reported_by_train.py": outcome.stats.get("device_name"),
                        **ran.placement}
    if cache is not None:  # the commit whose compile cache it started from; None: it compiled from nothing
        outcome.hardware["compile_cache"] = plan.given
    outcome.summary = summarize(result)
    try:
        ws.check_integrity(before)
    except WorkspaceError as e:
        outcome.failure, outcome.reason = Failure.TAMPERING, f"tampering: {e}"
        return outcome
    if result.get("outcome") == "stopped":
        outcome.stopped, outcome.reason = True, result.get("reason", "stopped")
        return outcome
    if result.get("outcome") != "ok":
        outcome.failure = Failure(result.get("failure", Failure.EXIT.value))
        outcome.reason = result.get("reason") or "the trial failed"
        return outcome
    outcome.val_bpb = float(result["val_bpb"])
    with open(log_path, "a") as log:
        log.write("\n" + summary_block(outcome.summary))
    outcome.log_tail = _read_tail(log_path)
    return outcome
