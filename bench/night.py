"""A short night through the real loop, to see what a keep rule keeps and what it costs.

    python bench/night.py --proposer null [--proposals 20] [--budget 10] [--rule noise]
    python bench/night.py --proposer search --rule strict --proposals 10 --confirm

Makes a workspace of the template (`--profile`, default cpu), runs the baseline (three seeds) and then
`--proposals` proposals, exactly as `autoresearch run` does (the rule's reruns and runs of the best
included). `--proposer null` proposes edits that change nothing the model computes (every other one
sets SEED to a new value, the rest add a comment): every keep is a false keep, and the reference's
strict rule is also played back on the same runs (each proposal's first run against the mean of the
best's runs before it, the best moving to what it kept). `--proposer search` is the search proposer
with its defaults. `--confirm` ends with `autoresearch confirm` (3 fresh runs of the best and of the
baseline), whatever the rule, so that two rules' bests can be compared on fresh runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from autoresearch.harness import PreparedData, get_profile, prepare, resolve_source
from autoresearch.lab.confirm import confirm
from autoresearch.lab.decide import DecisionRule
from autoresearch.lab.loop import Lab
from autoresearch.lab.outcomes import RUN_AGAIN, Kind, Status
from autoresearch.lab.proposer import ProposalContext, Proposer
from autoresearch.lab.workspace import Workspace
from autoresearch.proposers.search import SearchProposer


class NullProposer(Proposer):
    """Proposes edits that change nothing the model computes: a new SEED every other time, else a comment."""

    name = "null"

    def __init__(self, n: int):
        self.n = n

    def propose(self, ctx: ProposalContext) -> str | None:
        done = sum(1 for t in ctx.history if t.proposer == self.name and t.kind == Kind.CANDIDATE
                   and t.status not in RUN_AGAIN)
        if done >= self.n:
            return None
        path = ctx.workspace / "train.py"
        text = path.read_text()
        if done % 2 == 0:
            path.write_text(re.sub(r"^SEED = \d+", f"SEED = {1000 + done}", text, count=1, flags=re.MULTILINE))
            return f"null: SEED = {1000 + done}"
        path.write_text(text + f"# a note that changes nothing ({done})\n")
        return f"null: a comment ({done})"


def strict_replay(trials) -> int:
    """How many of the candidates the reference's rule would have kept, from their first runs."""
    baseline = [t.val_bpb for t in trials if t.kind == Kind.BASELINE and t.val_bpb is not None]
    best, kept = list(baseline), 0
    for t in trials:
        if t.kind == Kind.CANDIDATE and t.val_bpb is not None:
            if t.val_bpb < statistics.fmean(best):
                kept += 1
                best = [t.val_bpb]
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proposer", choices=("null", "search"), default="null")
    ap.add_argument("--rule", choices=("noise", "strict"), default="noise")
    ap.add_argument("--confirm", action="store_true", help="end with a confirmation of the best (no ablation)")
    ap.add_argument("--proposals", type=int, default=20)
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
          f"profile {profile.name}, budget {args.budget:g}s, {args.proposals} {args.proposer} proposals, rule {args.rule}",
          flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ws = Workspace.create(Path(tmp) / "ws", tag="night", profile=profile.name, data=data, time_budget=args.budget,
                              rule=DecisionRule(name=args.rule, drift_every=0 if args.rule == "strict" else 10))
        lab = Lab(ws, log=lambda m: print(m, flush=True))
        try:
            if args.proposer == "null":
                proposer = NullProposer(args.proposals)
            else:
                proposer = SearchProposer.from_settings(ws.root, ws.settings().get("search", {}))
            lab.run(proposer, max_trials=args.proposals)
            confirmation = confirm(lab, ablate=False) if args.confirm else None
            trials = lab.ledger.trials()
            noise = lab.noise()
        finally:
            lab.close()
    candidates = [t for t in trials if t.kind == Kind.CANDIDATE]
    runs = sum(t.kind in (Kind.CANDIDATE, Kind.RERUN) and t.val_bpb is not None for t in trials)
    result = {"proposer": args.proposer, "rule": args.rule, "proposals": len(candidates),
              "kept": sum(t.status == Status.KEEP for t in candidates),
              "crashed": sum(t.status == Status.CRASH for t in candidates),
              "runs_per_candidate": runs / len(candidates) if candidates else None,
              "runs_of_the_best": sum(t.kind == Kind.DRIFT for t in trials), "sigma": noise.sigma, "df": noise.df,
              "hours": (time.time() - started) / 3600}
    if args.proposer == "null":
        result["kept_by_the_strict_rule_on_the_same_runs"] = strict_replay(trials)
    if confirmation is not None:
        result["confirmed_gain"] = asdict(confirmation.gain)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({**result, "trials": [[t.id, str(t.kind), str(t.status), t.val_bpb]
                                                                   for t in trials]}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
