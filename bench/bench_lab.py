"""Lab overhead per trial: everything but the trainer's own run.

    python bench/bench_lab.py --profile h100 --source DIR [--budget 30] [--trials 3] [--trainer PATH]

Makes a workspace, runs the baseline once, then `--trials` candidates (a comment appended to
train.py each time, so every trial is audited, committed, run, scored, decided and reverted) and
splits each candidate's wall time into the trainer's process and the lab's own work (audit, git,
process start, the checkpoint's evaluation in a separate process, the ledger). The overhead does
not depend on the budget, so a short budget measures it; it is reported against 300 s.
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
from autoresearch.lab.loop import Lab
from autoresearch.lab.workspace import Workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--source", help="corpus (default: the profile's)")
    ap.add_argument("--data", help="an already prepared data folder (skips `prepare`; for machines without rustbpe)")
    ap.add_argument("--budget", type=float, default=20.0)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--trainer", help="a train.py to use instead of the template's")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    profile = get_profile(args.profile)
    if args.data:
        data = PreparedData.open(Path(args.data), profile)
    else:
        data, _ = prepare(resolve_source(args.source or profile.default_source), profile, progress=False)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"# {time.strftime('%Y-%m-%d')} {device}, torch {torch.__version__}, profile {profile.name}, "
          f"budget {args.budget:g}s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Path(args.trainer).read_text() if args.trainer else None
        ws = Workspace.create(Path(tmp) / "ws", tag="bench", profile=profile.name, data=data,
                              rule=DecisionRule(baseline_runs=1, drift_every=0), trainer_source=trainer,
                              time_budget=args.budget)
        lab = Lab(ws, log=lambda msg: print(msg, flush=True))
        lab.baseline()
        rows = []
        for i in range(args.trials):
            with open(ws.root / "train.py", "a") as f:
                f.write(f"# bench edit {i}\n")
            t0 = time.perf_counter()
            trial = lab.candidate(f"bench edit {i}", "bench")
            wall = time.perf_counter() - t0
            evaluation = json.loads((ws.trial_dir(trial.id) / "eval-val.json").read_text())
            trainer_s = trial.total_seconds
            rows.append({"wall_s": wall, "trainer_process_s": trainer_s, "training_s": trial.training_seconds,
                         "eval_process_s": evaluation["seconds"], "lab_overhead_s": wall - trainer_s,
                         "status": trial.status})
            print(f"trial {trial.id}: wall {wall:.1f}s = trainer process {trainer_s:.1f}s (training "
                  f"{trial.training_seconds:.1f}s) + lab {wall - trainer_s:.1f}s (of which evaluation "
                  f"process {evaluation['seconds']:.1f}s)", flush=True)
        overhead = statistics.median(r["lab_overhead_s"] for r in rows)
        print(f"lab overhead per trial: median {overhead:.1f}s = {100 * overhead / 300:.1f}% of a 300 s budget")
        if args.out:
            Path(args.out).write_text(json.dumps({"rows": rows, "median_overhead_s": overhead}, indent=2))
        lab.close()


if __name__ == "__main__":
    sys.exit(main())
