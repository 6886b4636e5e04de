"""Where a trial's seconds go, from the lab's decision to run it to its verdict in the ledger; and what
the sandbox costs, side by side with the same trial unsandboxed.

    python bench/bench_lab.py --profile h100 --data DIR [--budget 30] [--trials 4] [--modes sandboxed,unsandboxed]
    python bench/bench_lab.py --modes sandboxed,standby [--think 10]     # a standby's start-up against a fresh one
    python bench/bench_lab.py --modes standby,cached                     # and a compile cache's warm-up

Makes a workspace (the strict rule, so that each candidate is one run), runs the baseline once (timed
too: a run's first trial, fresh and compiled from nothing), then
`--trials` candidates, each a comment appended to train.py, so that every one is audited, committed,
run, scored, decided and reverted, the modes taken in turn (sandboxed, unsandboxed, sandboxed, ...).
Each trial's wall time is split by the supervisor's own clock (result.json): start-up (launch to
the first batch asked for), warm-up (to training_started), training, the hand-in and the trainer's
end, scoring, and the rest (the lab: audit, git, the supervisor's start, the ledger). Also the
tokens/s the lab counted. Every candidate trains the same code, so the modes differ only by the
sandbox, or by whether the trial ran in a standby (sandboxed, its sandboxes made and its imports done
beside the trial before it: on a GPU while it was scored, on a CPU once it had ended;
lab.executor.LocalExecutor), or by whether it started, in a standby, from the compile cache that the
baseline's run left (`cached`; lab.compile_cache; with it, the baseline of a second workspace of the same
train.py is timed last, its first trial started from the store). Scoring is split too: the first model process's load,
the rows, the second's load, the probes' copies. `--think` waits that many seconds
between trials, outside their wall time, as a proposer that thinks (an LLM) makes the lab wait.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from autoresearch.harness import PreparedData, get_profile, prepare, resolve_source
from autoresearch.lab.decide import DecisionRule
from autoresearch.lab.executor import LocalExecutor
from autoresearch.lab.loop import Lab
from autoresearch.lab.workspace import Workspace

PHASES = ("lab_before", "startup", "warmup", "training", "handin", "scoring", "lab_after")


def phases(wall: float, supervisor_wall: float, clock: dict) -> dict:
    """Seconds per phase of one trial; `clock` is the supervisor's, in seconds from its own start."""
    get = lambda key, default: clock.get(key) if clock.get(key) is not None else default  # noqa: E731
    launched = get("launched", 0.0)
    first = get("first_request", launched)
    started = get("started", first)
    checkpoint = get("checkpoint", started)
    scoring_started = get("scoring_started", checkpoint)
    scoring_ended = get("scoring_ended", scoring_started)
    lab = wall - supervisor_wall  # the lab's own work, before the supervisor and after it
    return {"lab_before": launched, "startup": first - launched, "warmup": started - first,
            "training": checkpoint - started, "handin": scoring_started - checkpoint,
            "scoring": scoring_ended - scoring_started, "lab_after": supervisor_wall - scoring_ended + lab}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--source", help="corpus (default: the profile's)")
    ap.add_argument("--data", help="an already prepared data folder (skips `prepare`; for machines without rustbpe)")
    ap.add_argument("--budget", type=float, default=20.0)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--modes", default="sandboxed,unsandboxed", help="taken in turn, one a trial")
    ap.add_argument("--trainer", help="a train.py to use instead of the template's")
    ap.add_argument("--think", type=float, default=0.0, help="seconds between trials, as a proposer thinking")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    profile = get_profile(args.profile)
    if args.data:
        data = PreparedData.open(Path(args.data).resolve(), profile)
    else:
        data, _ = prepare(resolve_source(args.source or profile.default_source), profile, progress=False)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    modes = args.modes.split(",")
    print(f"# {time.strftime('%Y-%m-%d')} {device}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"profile {profile.name}, budget {args.budget:g}s, modes {modes}", flush=True)
    rows = []
    stands_by = {"standby", "cached"}

    def measure(run, ws, mode: str, used_standby: bool) -> dict:
        """Time one trial, `run()`, end to end as the lab runs it, and print where its seconds went."""
        t0 = time.perf_counter()
        trial = run()
        wall = time.perf_counter() - t0
        result = json.loads((ws.trial_dir(trial.id) / "result.json").read_text())
        split = phases(wall, trial.total_seconds, result.get("clock", {}))
        assert bool(trial.hardware.get("standby")) == used_standby, (mode, trial.hardware)
        cache = result.get("compile_cache") or {}
        row = {"trial": trial.id, "mode": mode, "status": str(trial.status), "wall_s": wall,
               "beyond_budget_s": wall - args.budget, "tokens_per_s": trial.tokens_per_second,
               "val_bpb": trial.val_bpb, "standby_wait_s": result.get("standby_wait_seconds"),
               "scoring_parts_s": (result.get("score") or {}).get("seconds"),
               "compile_cache_given": trial.hardware.get("compile_cache"), "cache_seeded": cache.get("seeded"),
               "cache_snapshot": cache.get("snapshot"), **{f"{k}_s": v for k, v in split.items()}}
        rows.append(row)
        print(f"trial {trial.id} {mode}: wall {wall:.1f}s ({wall - args.budget:+.1f}s beyond the budget) = "
              + ", ".join(f"{k} {v:.1f}" for k, v in split.items())
              + (f" (of which waiting for the standby {row['standby_wait_s']:.1f})" if used_standby else "")
              + f"; {trial.tokens_per_second or 0:,.0f} tokens/s; scoring {row['scoring_parts_s']}"
              + (f"; compile cache seeded {row['cache_seeded']}" if row["cache_seeded"] else "")
              + (f"; its snapshot {row['cache_snapshot']}" if row["cache_snapshot"] else ""), flush=True)
        return row

    def workspace(folder: Path) -> Workspace:
        return Workspace.create(folder, tag="bench", profile=profile.name, data=data, trainer_source=trainer,
                                rule=DecisionRule(name="strict", baseline_runs=1, drift_every=0), time_budget=args.budget)

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["AUTORESEARCH_CACHE"] = str(Path(tmp) / "cache")  # the compile caches' store: empty at first
        trainer = Path(args.trainer).read_text() if args.trainer else None
        ws = workspace(Path(tmp) / "ws")
        # The baseline (a first trial: fresh, compiled from nothing) makes the first trial's standby, and the
        # compile cache that `cached` trials start from.
        executor = LocalExecutor(standby=modes[0] in stands_by, compile_cache="cached" in modes)
        lab = Lab(ws, log=lambda msg: print(msg, flush=True), executor=executor)
        try:
            measure(lambda: lab.baseline() and lab.ledger.trials()[-1], ws, "first", False)
            for i in range(args.trials):
                mode = modes[i % len(modes)]
                lab.sandboxed = mode != "unsandboxed"
                executor.standby = modes[(i + 1) % len(modes)] in stands_by  # for the next trial
                executor.compile_cache = mode == "cached"
                time.sleep(args.think)
                before = ws.snapshot()
                with open(ws.root / "train.py", "a") as f:
                    f.write(f"# bench edit {i}\n")
                row = measure(lambda: lab.candidate(f"bench edit {i} ({mode})", "bench", before=before), ws, mode,
                              mode in stands_by)
                assert mode == "cached" or row["compile_cache_given"] is None, row
                if mode == "cached" and row["compile_cache_given"] is None:
                    print("  (no compile cache to start from: the baseline's run compiled nothing)", flush=True)
        finally:
            lab.close()
        if "cached" in modes:  # a new workspace of the same train.py: its first trial starts from the store
            again = workspace(Path(tmp) / "again")
            lab = Lab(again, log=lambda msg: print(msg, flush=True), executor=LocalExecutor(False, True))
            try:
                measure(lambda: lab.baseline() and lab.ledger.trials()[-1], again, "first, new workspace", False)
            finally:
                lab.close()
    for mode in dict.fromkeys(modes):
        mine = [r for r in rows if r["mode"] == mode]
        if mine:
            print(f"{mode}: median {statistics.median(r['beyond_budget_s'] for r in mine):.1f}s beyond the budget, "
                  f"median {statistics.median(r['tokens_per_s'] or 0 for r in mine):,.0f} tokens/s over {len(mine)} trial(s)")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "budget": args.budget, "device": device}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
