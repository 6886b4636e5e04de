"""Trials per hour with several trial slots against one, through the real loop, side by side.

    python bench/bench_parallel.py [--slots 1,2] [--executors local] [--proposals 8] [--budget 10]
                                   [--profile cpu] [--data DIR]

For each executor and slot count, in turn and twice over (1, 2, 1, 2 by default), a fresh workspace of the
template runs its baseline (one run, strict rule) and then `--proposals` proposals that change
nothing the model computes (a comment each, handed out in order), exactly as `autoresearch run
--parallel N` does. Measured from the end of the baseline to the end of the last trial:

- trials per hour: every trial row that ran in that time (candidates, re-applications, runs of the
  best), divided by the wall time;
- the scheduling overhead per trial: the slots' time not spent inside a trial's supervisor, by the
  supervisor's own clock (proposing, git, the ledger, waiting for work, and for `ray` the task's
  dispatch, its inputs and files shipped both ways), N x wall - the supervisors' seconds, per trial;
  and of that, what the executor alone added (the lab's wait on a trial, less its supervisor's time);
- each slot's busy fraction: its trials' seconds over the wall time.

On a CPU the slots share the machine's cores (threads = cores / N), so start-up, compile and
scoring of concurrent trials compete; on GPUs each slot has its own.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from autoresearch.harness import PreparedData, get_profile, prepare, resolve_source
from autoresearch.lab.decide import DecisionRule
from autoresearch.lab import devices
from autoresearch.lab.executor import LocalExecutor
from autoresearch.lab.loop import Lab
from autoresearch.lab.outcomes import Kind
from autoresearch.lab.workspace import Workspace
from autoresearch.proposers.scripted import ScriptedProposer


def null_edits(n: int) -> list[dict]:
    """n edits that each add a different comment after the first line: nothing the model computes."""
    return [{"description": f"null: a comment ({k})", "replace": [["\n", f"\n# a note that changes nothing ({k})\n"]]}
            for k in range(n)]


def make_executor(name: str, data: PreparedData):
    if name == "ray":  # a cluster inside this process, with this machine's CPUs
        from autoresearch.lab.ray_executor import RayExecutor

        return RayExecutor(data.path, address=None, init={"num_cpus": devices.cpu_count(), "num_gpus": 0})
    return LocalExecutor()


def one_night(data: PreparedData, profile: str, budget: float, slots: int, proposals: int, executor: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.create(Path(tmp) / "ws", tag="parallel", profile=profile, data=data, time_budget=budget,
                              rule=DecisionRule(name="strict", baseline_runs=1, drift_every=0))
        runner = make_executor(executor, data)
        lab = Lab(ws, log=lambda m: None, slots=runner.slots(slots), executor=runner)
        try:
            lab.baseline()
            after_baseline = max(t.id for t in lab.ledger.trials())
            started = time.time()
            lab.run(ScriptedProposer(null_edits(proposals)), max_trials=proposals)
            wall = time.time() - started
            trials = [t for t in lab.ledger.trials() if t.id > after_baseline and t.total_seconds]
        finally:
            lab.close()
    busy = sum(t.total_seconds for t in trials)
    supervised = sum(t.trainer_summary.get("total_seconds") or t.total_seconds for t in trials)
    return {"executor": executor, "slots": slots, "trials": len(trials),
            "candidates": sum(t.kind == Kind.CANDIDATE for t in trials),
            "wall_s": round(wall, 1), "trials_per_hour": round(3600 * len(trials) / wall, 1),
            "mean_trial_s": round(busy / len(trials), 2) if trials else None,
            "overhead_per_trial_s": round((slots * wall - supervised) / len(trials), 2) if trials else None,
            "executor_overhead_per_trial_s": round((busy - supervised) / len(trials), 2) if trials else None,
            "busy_fraction": round(busy / (slots * wall), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", default="1,2", help="slot counts to compare, in the order run (default: 1,2)")
    ap.add_argument("--executors", default="local", help="executors to compare: local, ray (an in-process Ray "
                    "cluster of this machine's CPUs), or both, in the order run (default: local)")
    ap.add_argument("--rounds", type=int, default=2, help="times each slot count runs, interleaved (default: 2)")
    ap.add_argument("--proposals", type=int, default=8)
    ap.add_argument("--budget", type=float, default=10.0)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--data", help="an already prepared data folder (skips `prepare`)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    profile = get_profile(args.profile)
    data = (PreparedData.open(Path(args.data), profile) if args.data else
            prepare(resolve_source(profile.default_source), profile, progress=False)[0])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"# {time.strftime('%Y-%m-%d')} {device}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"profile {profile.name}, budget {args.budget:g}s, {args.proposals} null proposals per night", flush=True)
    arms = [(e, int(n)) for e in args.executors.split(",") for n in args.slots.split(",")]
    nights = []
    for _ in range(args.rounds):
        for executor, n in arms:
            night = one_night(data, profile.name, args.budget, n, args.proposals, executor)
            print(json.dumps(night), flush=True)
            nights.append(night)
    summary = {}
    for executor, n in arms:
        mine = [x for x in nights if (x["executor"], x["slots"]) == (executor, n)]
        summary[f"{executor} x{n}"] = {key: round(statistics.fmean(x[key] for x in mine), 2) for key in
                                       ("trials_per_hour", "overhead_per_trial_s", "executor_overhead_per_trial_s")}
    base = summary[f"{arms[0][0]} x{arms[0][1]}"]["trials_per_hour"]
    for arm in summary.values():
        arm["speedup"] = round(arm["trials_per_hour"] / base, 3)
    print(json.dumps({"summary": summary}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({"nights": nights, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
