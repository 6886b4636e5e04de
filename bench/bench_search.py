"""Research efficiency of the `search` proposer: TPE against random search, same space, same budget.

From one baseline (measured `--baseline-runs` times under different seeds: its spread is the noise
floor sigma), each arm runs the real lab loop (`Lab.run`: commit, train, measure, keep/discard)
for `--trials` proposals of the `search` proposer, with its sampler set to `tpe` or to `random`
(Optuna's RandomSampler over the same space, same subset-of-constants moves). Reported per arm:
the lab's best val_bpb (the mean over the kept best commit's runs) after each trial, and the gain
over the baseline in units of sigma. Both arms start from a copy of the same baseline workspace,
so they share its sigma, and run one after the other (never at once: the budget is wall clock).

Also measured: proposal latency (time from `tell` to the next edit written) on a study that
already holds ~50 trials, without training (synthetic outcomes).

    python bench/bench_search.py                                  # the issue's: 20 trials x 60 s each
    python bench/bench_search.py --trials 12 --budget 20 --out /tmp/bench_search
    python bench/bench_search.py --trainer tests/trainers/tiny_train.py --budget 2 --trials 5 \\
        --settings '{"include": ["BATCH"], "space": {"DIM": {"low": 8, "high": 64, "log": true}}}'
    python bench/bench_search.py --latency-only

Re-running with the same --out continues where it stopped (each arm is a resumable workspace).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# --- the research runs ----------------------------------------------------------------------------
def prepared_data(profile_name: str):
    from autoresearch.harness import get_profile, prepare
    from autoresearch.harness.sources import resolve_source

    profile = get_profile(profile_name)
    data, _ = prepare(resolve_source(profile.default_source), profile, progress=False)
    return data


def baseline_workspace(out: Path, args) -> Path:
    from autoresearch.harness import get_profile, render_trainer
    from autoresearch.lab.decide import DecisionRule
    from autoresearch.lab.loop import Lab
    from autoresearch.lab.workspace import Workspace

    root = out / "baseline"
    if not (root / ".autoresearch" / "config.json").exists():
        if root.exists():
            shutil.rmtree(root)
        trainer = Path(args.trainer).read_text() if args.trainer else render_trainer(get_profile(args.profile))
        ws = Workspace.create(root, tag="bench", profile=args.profile, data=prepared_data(args.profile),
                              trainer_source=trainer, time_budget=args.budget,
                              rule=DecisionRule(baseline_runs=args.baseline_runs, drift_every=0))
        if args.training_tolerance is not None:
            ws.config["training_tolerance"] = args.training_tolerance
            ws.save_config()
    ws = Workspace.open(root)
    lab = Lab(ws, log=lambda m: log(f"baseline: {m}"))
    try:
        lab.resume()
        lab.baseline()
    finally:
        lab.close()
    return root


def arm(out: Path, base: Path, sampler: str, args) -> Path:
    import uuid

    from autoresearch.lab.loop import Lab
    from autoresearch.lab.workspace import Workspace
    from autoresearch.proposers.search import SearchProposer

    root = out / sampler
    if not root.exists():
        shutil.copytree(base, root, symlinks=True)
        ws = Workspace.open(root)
        ws.config["id"] = uuid.uuid4().hex[:12]  # its own process token
        ws.save_config()
    ws = Workspace.open(root)
    settings = {"seed": args.seed, "sampler": sampler, **json.loads(args.settings)}
    proposer = SearchProposer.from_settings(root, settings)
    lab = Lab(ws, log=lambda m: log(f"{sampler}: {m}"))
    try:
        done = sum(1 for t in lab.ledger.trials(kind="candidate"))
        if done < args.trials:
            lab.run(proposer, max_trials=args.trials - done)
    finally:
        lab.close()
    return root


def curve(root: Path) -> dict:
    """Per candidate: its own val_bpb (mean of its runs) and the lab's best after it."""
    from autoresearch.report.data import fmean, load

    a = load(root)
    # The lab's best once a candidate and its reruns are done: what the next one was measured against.
    bests = [fmean(a.best_before[t.id][1]) for t in a.candidates[1:]] + [a.best_mean]
    rows = [{"id": t.id, "description": t.description, "status": t.status, "val_bpb": fmean(t.values),
             "runs": len(t.values), "best": best, "seconds": (t.ended_at or t.started_at) - t.started_at}
            for t, best in zip(a.candidates, bests)]
    return {"baseline": a.baseline_values, "baseline_mean": a.baseline_mean, "sigma": a.sigma, "trials": rows,
            "best_commit": a.best_commit}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    first = next(iter(results.values()))
    mean, sigma = first["baseline_mean"], first["sigma"] or 0.0
    n = max(len(r["trials"]) for r in results.values())
    ax.axhspan(mean - sigma, mean + sigma, color="0.85", label=f"baseline {mean:.4f} ± σ ({sigma:.4f})")
    ax.axhline(mean, color="0.5", lw=0.8)
    colors = {"tpe": "tab:blue", "random": "tab:orange"}
    measured = [r["val_bpb"] for res in results.values() for r in res["trials"] if r["val_bpb"] is not None]
    top = max([mean + 3 * sigma, *sorted(measured)[: max(1, int(0.8 * len(measured)))]]) if measured else mean + 1
    for name, res in results.items():
        xs = list(range(len(res["trials"]) + 1))
        best = [res["baseline_mean"]] + [r["best"] for r in res["trials"]]
        gain = (res["baseline_mean"] - best[-1]) / sigma if sigma else float("nan")
        ax.step(xs, best, where="post", color=colors.get(name), lw=2,
                label=f"{name}: best after {len(xs) - 1} trials {best[-1]:.4f} ({gain:+.1f} σ)")
        pts = [(i + 1, r["val_bpb"]) for i, r in enumerate(res["trials"]) if r["val_bpb"] is not None]
        ax.scatter([p[0] for p in pts], [min(p[1], top) for p in pts], s=14, color=colors.get(name), alpha=0.5)
        crashes = [i + 1 for i, r in enumerate(res["trials"]) if r["val_bpb"] is None]
        ax.scatter(crashes, [top] * len(crashes), marker="x", color=colors.get(name), alpha=0.7)
    ax.set_ylim(min(min(measured, default=mean), mean - sigma) - 0.01, top + 0.01)
    ax.set_xlim(0, n + 0.5)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("trial (proposal)")
    ax.set_ylabel("val_bpb (lower is better)")
    ax.set_title("search: TPE vs random, running best val_bpb (dots: each trial; x: crash; clipped at top)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


# --- proposal latency -----------------------------------------------------------------------------
def latency(out: Path, n_history: int = 50, n_measured: int = 10, seed: int = 0) -> dict:
    """tell -> next edit on a study with ~n_history trials; synthetic outcomes, no training."""
    import math
    import random

    from autoresearch.harness import get_profile, render_trainer
    from autoresearch.lab.ledger import Trial
    from autoresearch.lab.proposer import ProposalContext
    from autoresearch.proposers.search import SearchProposer
    from autoresearch.proposers.space import parse_constants

    root = out / "latency"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    original = render_trainer(get_profile("cpu"))
    (root / "train.py").write_text(original)
    rng = random.Random(seed)

    def outcome(i: int, description: str) -> Trial:
        c = {n: x.value for n, x in parse_constants((root / "train.py").read_text()).items()}
        value = 1.9 + 0.05 * abs(math.log(c["MATRIX_LR"] / 0.04)) + 0.01 * abs(c["DEPTH"] - 5) + rng.gauss(0, 0.003)
        status = "crash" if rng.random() < 0.1 else "discard"
        row = dict(id=i, kind="candidate", commit_sha=None, parent_sha=None, proposer="search", description=description,
                   diff="", seed=None, status=status, failure="exit" if status == "crash" else None, reason="",
                   decision={}, val_bpb=None if status == "crash" else value, trainer_summary={},
                   training_seconds=None, total_seconds=None, total_tokens_m=None, num_steps=None, mfu_percent=None,
                   peak_vram_mb=None, hardware={}, device_class=None, tokens_per_second=None, sandboxed=True,
                   proposer_usage=dict(proposer.last_usage or {}), log_path="", started_at=0.0, ended_at=None)
        return Trial(**row)

    t0 = time.perf_counter()
    proposer = SearchProposer.from_settings(root, {"seed": seed})
    cold_init = time.perf_counter() - t0
    history: list[Trial] = []
    ctx = lambda: ProposalContext(root, ["train.py"], "cpu", 60.0, "0" * 40, 2.0, 0.01, history, seq_len=256)
    samples = []
    for i in range(1, n_history + n_measured + 1):
        (root / "train.py").write_text(original)  # the lab's reset to the best commit
        t_propose = time.perf_counter()
        description = proposer.propose(ctx())
        t_written = time.perf_counter()
        trial = outcome(i, description)
        history.append(trial)
        t_tell = time.perf_counter()
        proposer.tell(trial)
        t_told = time.perf_counter()
        if i > n_history:
            samples.append((t_told - t_tell) + (t_written - t_propose))
        else:
            last_propose = t_written - t_propose
    t0 = time.perf_counter()
    reopened = SearchProposer.from_settings(root, {"seed": seed})
    reopen = time.perf_counter() - t0
    (root / "train.py").write_text(original)
    t0 = time.perf_counter()
    reopened.propose(ctx())
    first_after_reopen = time.perf_counter() - t0
    samples.sort()
    return {"trials_in_study_at_start": n_history, "measured": n_measured,
            "tell_to_edit_median_s": samples[len(samples) // 2], "tell_to_edit_max_s": samples[-1],
            "cold_construct_s": cold_init, "reopen_construct_s": reopen,
            "first_propose_after_reopen_s": first_after_reopen, "last_warmup_propose_s": last_propose}


# --- main -------------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20, help="proposals per arm (default: 20, the issue's)")
    p.add_argument("--budget", type=float, default=60.0, help="training seconds per run (default: 60, cpu's)")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--trainer", help="a train.py to start from (default: the template rendered for --profile)")
    p.add_argument("--baseline-runs", type=int, default=3, help="seeds of the baseline, for sigma (default: 3)")
    p.add_argument("--samplers", default="tpe,random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", default="{}", help="more [search] settings, as JSON")
    p.add_argument("--out", default="/tmp/bench_search", help="workspaces and results (default: /tmp/bench_search)")
    p.add_argument("--plot", default=str(HERE / "search_vs_random.png"))
    p.add_argument("--threads", type=int, help="torch CPU threads of each trainer (OMP_NUM_THREADS; default: "
                   "torch's). On a shared machine 1 keeps step times steady: two threads that wait for each "
                   "other slow down many times over when another process takes a core")
    p.add_argument("--training-tolerance", type=float, help="how far past the budget the lab's clock may find "
                   "training (default: the lab's, 5%%); a loaded machine's slow last step can overshoot it")
    p.add_argument("--latency-only", action="store_true")
    args = p.parse_args()
    if args.threads:
        import os

        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(args.threads)  # inherited by every trainer the lab starts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import optuna
    import torch

    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": _cpus(),
            "python": platform.python_version(), "optuna": optuna.__version__, "torch": torch.__version__,
            "threads": args.threads, "load_avg_at_start": _load()}
    log(f"{meta}")
    lat = latency(out, seed=args.seed)
    log("latency: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in lat.items()))
    result = {"meta": meta, "latency": lat, "settings": vars(args)}
    if not args.latency_only:
        started = time.time()
        base = baseline_workspace(out, args)
        log(f"baseline done in {time.time() - started:.0f}s")
        arms = {}
        for sampler in args.samplers.split(","):
            t0 = time.time()
            arms[sampler] = curve(arm(out, base, sampler, args))
            log(f"{sampler} done in {time.time() - t0:.0f}s")
        result["arms"] = arms
        result["wall_s"] = time.time() - started
        result["load_avg_at_end"] = _load()
        for name, res in arms.items():
            final = res["trials"][-1]["best"] if res["trials"] else res["baseline_mean"]
            sigma = res["sigma"]
            kept = sum(r["status"] == "keep" for r in res["trials"])
            crashed = sum(r["status"] == "crash" for r in res["trials"])
            best_single = min((r["val_bpb"] for r in res["trials"] if r["val_bpb"] is not None), default=None)
            res["summary"] = {"final_best": final, "gain": res["baseline_mean"] - final,
                              "gain_sigma": (res["baseline_mean"] - final) / sigma if sigma else None,
                              "kept": kept, "crashed": crashed, "best_single_measurement": best_single}
            log(f"{name}: baseline {res['baseline_mean']:.4f} (sigma {sigma:.4f}) -> best {final:.4f} "
                f"= {res['summary']['gain_sigma']:+.2f} sigma; {kept} kept, {crashed} crashed, "
                f"best single run {best_single}")
        plot(arms, Path(args.plot))
        log(f"plot: {args.plot}")
    (out / "results.json").write_text(json.dumps(result, indent=1))
    log(f"results: {out / 'results.json'}")
    return 0


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()
    except OSError:
        return "?"


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    sys.exit(main())
