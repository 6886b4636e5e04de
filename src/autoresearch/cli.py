"""The `autoresearch` command. Thin: it parses arguments and calls the parts; nothing imports it."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from . import __version__
from .errors import UserError


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .harness import get_profile, prepare, resolve_source

    profile = get_profile(args.profile)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else None
    source = resolve_source(args.source or profile.default_source, cache=cache, num_shards=args.num_shards,
                            progress=not args.quiet)
    data, worked = prepare(source, profile, cache=cache, progress=not args.quiet)
    m = data.manifest
    print(("prepared" if worked else "already prepared (nothing to do)") + f": {data.path}")
    print(f"  profile   {profile.name}: seq_len {profile.seq_len}, budget {profile.time_budget:g}s, "
          f"vocab {profile.vocab_size}, eval cap {profile.eval_tokens:,} tokens")
    print(f"  source    {m['description']}")
    print(f"  tokenizer {data.tokenizer.vocab_size} tokens, sha256 {data.tokenizer.sha256[:12]}")
    for split in (s for s in ("train", "val", "test") if s in m["splits"]):
        info = m["splits"][split]
        note = ""
        if split == "val":
            evaluated = min(info["tokens"], profile.eval_tokens)
            note = f"  (evaluated: {evaluated:,} tokens{', the whole split' if evaluated == info['tokens'] else ''})"
        elif split == "test":
            note = "  (sealed: final reports only)"
        print(f"  {split:<9} {info['documents']:>8,} documents {info['tokens']:>13,} tokens{note}")
    if worked:
        print(f"  took      {m['seconds']:.1f}s")
    return 0


def _cmd_profiles(args: argparse.Namespace) -> int:
    from .harness import PROFILES

    for p in PROFILES.values():
        print(f"{p.name:<6} {p.description}")
        print(f"       seq_len {p.seq_len}, budget {p.time_budget:g}s, eval cap {p.eval_tokens:,} tokens, "
              f"vocab {p.vocab_size}, default source {p.default_source}")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from .harness import get_profile, prepare, resolve_source
    from .lab.decide import DecisionRule
    from .lab.workspace import Workspace

    profile = get_profile(args.profile)
    source = resolve_source(args.source or profile.default_source, num_shards=args.num_shards)
    runs = _first(args.baseline_runs, os.environ.get("AUTORESEARCH_BASELINE_RUNS"), 3)
    try:
        runs = int(runs)
    except ValueError:
        raise UserError(f"baseline runs must be a whole number, got {runs!r}") from None
    rule = DecisionRule(name=_first(args.rule, os.environ.get("AUTORESEARCH_RULE"), "noise"), baseline_runs=runs)
    data, _ = prepare(source, profile)
    trainer = Path(args.trainer).read_text() if args.trainer else None
    budget = _first(args.budget, os.environ.get("AUTORESEARCH_TIME_BUDGET"))
    ws = Workspace.create(Path(args.dir), tag=args.tag or time.strftime("%b%d").lower(), profile=profile.name,
                          data=data, rule=rule, trainer_source=trainer,
                          time_budget=float(budget) if budget is not None else None)
    print(f"workspace ready: {ws.root} (branch {ws.config['branch']}, profile {profile.name}, "
          f"budget {ws.time_budget:g}s, data {data.path})")
    theirs = ws.untracked_and_ignored()
    if theirs:
        print(f"note: {len(theirs)} untracked or ignored file(s) here ({', '.join(theirs[:3])}"
              f"{', ...' if len(theirs) > 3 else ''}) are safe: the lab writes only train.py, the branch "
              f"{ws.config['branch']}, results.tsv and {ws.lab_dir.name}/, and never cleans, resets or deletes "
              "anything else")
    print(f"next: `autoresearch run {args.dir}` to start the loop, or point a coding agent at "
          f"{ws.root / 'program.md'}")
    return 0


def _open_lab(args: argparse.Namespace, parallel: bool = False):
    """The lab for the workspace `args` name; with `parallel`, with the executor and trial slots `run`
    asks for (--parallel, else [run] parallel, else $AUTORESEARCH_PARALLEL, else every GPU or one CPU
    slot; --gpus-per-trial, else [run] gpus_per_trial, else 1; --executor, else [run] executor, else
    local)."""
    from .lab.loop import Lab
    from .lab.workspace import Workspace

    ws = Workspace.open(Path(args.workspace) if args.workspace else None)
    run_settings = ws.settings().get("run", {})
    unsandboxed = args.unsandboxed or bool(run_settings.get("unsandboxed", False))
    if unsandboxed:
        print("autoresearch: WARNING: running unsandboxed, as asked: train.py can read the answers, the network and "
              "your files; every trial is marked unsandboxed in the record.", file=sys.stderr)
    if not parallel:
        return Lab(ws, sandboxed=not unsandboxed)
    n = _first(args.parallel, run_settings.get("parallel"), os.environ.get("AUTORESEARCH_PARALLEL"))
    try:
        n = int(n) if n is not None else None
    except ValueError:
        raise UserError(f"parallel must be a whole number of trial slots, got {n!r}") from None
    k = _first(args.gpus_per_trial, run_settings.get("gpus_per_trial"), 1)
    try:
        k = int(k)
    except ValueError:
        raise UserError(f"gpus_per_trial must be a whole number of GPUs, got {k!r}") from None
    executor = _executor(_first(args.executor, run_settings.get("executor"), "local"), ws,
                         _first(args.address, run_settings.get("address"), "auto"), run_settings.get("standby"),
                         run_settings.get("compile_cache"))
    try:
        return Lab(ws, sandboxed=not unsandboxed, slots=executor.slots(n, k), executor=executor)
    except BaseException:
        executor.close()
        raise


def _executor(name: str, ws, address: str, standby=None, compile_cache=None):
    from .lab.executor import LocalExecutor

    for key, value in (("standby", standby), ("compile_cache", compile_cache)):
        if value is not None and not isinstance(value, bool):
            raise UserError(f"[run] {key} must be true or false, got {value!r}")
    if name == "local":
        return LocalExecutor(standby, compile_cache)
    if name == "ray":
        from .lab.ray_executor import RayExecutor

        print(f"autoresearch: connecting to the Ray cluster at {address} ...", file=sys.stderr)
        return RayExecutor(Path(ws.config["data"]), address)
    raise UserError(f"executor must be local or ray, got {name!r}")


def _slot_label(slot) -> str:
    where = f"{slot.host}: " if slot.node else ""
    if slot.device == "cuda":
        if slot.gpus:
            return where + ("GPU " if len(slot.gpus) == 1 else "GPUs ") + ",".join(map(str, slot.gpus))
        return where + (f"{slot.ranks} GPUs" if slot.ranks > 1 else "a GPU")
    return where + (f"{slot.threads} CPU threads" if slot.threads else "the CPU")


def _stop_on_signals(lab) -> None:
    """First Ctrl-C (or SIGTERM): finish cleanly, stopping the trial in flight. Second: stop at once."""
    def handler(signum, frame):
        if lab.stop.is_set():
            raise KeyboardInterrupt
        lab.stop.set()
        print("\nstopping: the trial in flight is stopped and recorded as such; `autoresearch run` runs it again "
              "(Ctrl-C again to abort)", file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _show_progress(lab) -> threading.Thread | None:
    """On a terminal: one line, rewritten in place, with the running trial's step, loss and time left."""
    if not sys.stderr.isatty():
        return None
    from .report.data import parse_progress_line, read_tail

    def watch():
        shown = ""
        while True:
            running = sorted(lab.running.items())
            if not running:
                if shown:
                    print("\r" + " " * len(shown) + "\r", end="", file=sys.stderr, flush=True)
                    shown = ""
                time.sleep(0.5)
                continue
            parts = []
            for _, (trial_id, log) in running:  # one part per slot with a trial in flight
                points = [p for p in map(parse_progress_line, (read_tail(log, 4096) or "").splitlines()) if p]
                if points:
                    p = points[-1]
                    parts.append(f"trial {trial_id}: step {p.get('step')}, loss {p.get('loss', float('nan')):.4f}, "
                                 f"{p.get('remaining_s', 0):.0f} s left")
            if parts:
                line = "  " + " | ".join(parts)
                print("\r" + line.ljust(len(shown)), end="", file=sys.stderr, flush=True)
                shown = line
            time.sleep(1.0)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _cmd_baseline(args: argparse.Namespace) -> int:
    lab = _open_lab(args)
    _stop_on_signals(lab)
    _show_progress(lab)
    try:
        with lab.ws.lock("baseline"):
            lab.resume()
            best = lab.baseline()
        if best is None:
            print("stopped before the baseline was complete; `autoresearch baseline` continues it")
            return 0
        noise = lab.noise()
        print(f"baseline: val_bpb {best.mean:.6f} over {len(best.values)} run(s)"
              + (f", noise sigma {noise.sigma:.6f} ({noise.df} df)" if noise.sigma is not None else ""))
    finally:
        lab.close()
    return 0


def _cmd_trial(args: argparse.Namespace) -> int:
    if os.environ.get("AUTORESEARCH_AGENT"):
        # An agent run by the loop proposes; the loop runs the trial. Running one here would nest.
        print("autoresearch: error: this agent was started by `autoresearch run`, which runs the trial "
              "itself: edit train.py and end your turn.", file=sys.stderr)
        return 2
    from .lab.outcomes import Status

    lab = _open_lab(args)
    _stop_on_signals(lab)
    _show_progress(lab)
    try:
        with lab.ws.lock("trial"):
            trial = lab.candidate(args.message, args.proposer)
    finally:
        lab.close()
    # The lab has said how the trial ended, and why, once; what is left is where to read more.
    if trial.status == Status.CRASH:
        if trial.log_path and Path(trial.log_path).is_file():
            print(f"  the trial's log: {trial.log_path}")
        return 1
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .proposers import make_proposer

    lab = _open_lab(args, parallel=True)
    try:
        settings = lab.ws.settings()
        run_settings = settings.get("run", {})
        name = args.proposer or ("agent" if args.agent else "scripted" if args.script else
                                 run_settings.get("proposer", "search"))
        if args.agent and name != "agent":
            raise UserError(f"--agent {args.agent} names a coding agent, but the proposer is {name}")
        proposer_settings = dict(settings.get(name, {}))
        overrides = {"preset": args.agent, "model": args.model, "api": args.api, "max_cost": args.max_cost}
        for key, value in overrides.items():
            if value is not None:
                proposer_settings[key] = value
        proposer = make_proposer(name, lab.ws.root, proposer_settings,
                                 script=Path(args.script) if args.script else None)
        _stop_on_signals(lab)
        _show_progress(lab)
        max_trials = _first(args.max_trials, os.environ.get("AUTORESEARCH_MAX_TRIALS"), run_settings.get("max_trials"))
        confirm_runs = _first(args.confirm_runs, os.environ.get("AUTORESEARCH_CONFIRM_RUNS"),
                              run_settings.get("confirm_runs"), 3)
        if len(lab.slots) > 1 or lab.executor.name != "local":
            print(f"autoresearch: {len(lab.slots)} trial slot(s) ({lab.executor.name}): "
                  + ", ".join(_slot_label(slot) for slot in lab.slots))
        with lab.ws.lock("run"):
            lab.run(proposer, max_trials=int(max_trials) if max_trials is not None else None,
                    max_hours=args.max_hours if args.max_hours is not None else run_settings.get("max_hours"),
                    confirm_runs=int(confirm_runs))
    finally:
        lab.close()
    if lab.stop.is_set():
        print("stopped cleanly; `autoresearch run` continues where this stopped")
    return 0


def _cmd_confirm(args: argparse.Namespace) -> int:
    from .lab.confirm import confirm

    lab = _open_lab(args)
    _stop_on_signals(lab)
    _show_progress(lab)
    try:
        with lab.ws.lock("confirm"):
            lab.resume()
            if lab.best() is None:
                raise UserError("There is no baseline yet: run `autoresearch run` (or `autoresearch baseline`) first.")
            confirm(lab, runs=args.runs, ablate=not args.no_ablation)
    finally:
        lab.close()
    return 0


def _first(*values):
    return next((v for v in values if v is not None), None)


def _cmd_status(args: argparse.Namespace) -> int:
    from .report import status

    return status(args.workspace, last=args.last, watch=args.watch, interval=args.interval)


def _cmd_report(args: argparse.Namespace) -> int:
    """The lab scores the sealed test where it is missing (in its sandboxes, holding the workspace's lock),
    then the report reads. While a lab runs, it holds the lock: the report then shows what is cached."""
    from .report import report

    if args.test_eval == "auto":
        from .lab import sealed
        from .lab.sandbox import SandboxUnavailable
        from .lab.workspace import Workspace, WorkspaceBusy, WorkspaceError

        ws = Workspace.open(Path(args.workspace) if args.workspace else None)
        unsandboxed = bool(ws.settings().get("run", {}).get("unsandboxed", False))
        try:
            sealed.score(ws, sandboxed=not unsandboxed, log=lambda m: print(m, file=sys.stderr, flush=True))
        except WorkspaceBusy:
            print(f"autoresearch report: {ws.holder() or 'a lab'} holds the workspace; the sealed test is scored when "
                  "the lab is idle, and this report shows what is cached", file=sys.stderr)
        except SandboxUnavailable as e:
            raise SandboxUnavailable(f"{e}\nThe sealed test runs each commit's train.py, so it is scored in the "
                                     "sandbox too: set [run] unsandboxed = true in autoresearch.toml to score it "
                                     "without one, or pass --test-eval never for a report without it.") from None
        except WorkspaceError as e:  # a changed harness: its scores would not be comparable with the trials'
            raise WorkspaceError(f"{e}\nThe sealed test was not scored; pass --test-eval never for a report "
                                 "without it.") from None
    return report(args.workspace, args.out)


def _cmd_export(args: argparse.Namespace) -> int:
    from .report import export

    return export(args.workspace, args.out)


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from .report import dashboard

    return dashboard(args.workspace, port=args.port, host=args.host, open_browser=args.open)


UNSANDBOXED_HELP = ("run train.py without the sandbox (where none can be had: macOS, a container without the "
                    "privileges). It can then read the answers, the network and your files; every trial is "
                    "marked unsandboxed in the record. Also [run] unsandboxed = true in autoresearch.toml")


def build_parser() -> argparse.ArgumentParser:
    from .harness import PROFILES

    parser = argparse.ArgumentParser(
        prog="autoresearch",
        description="Overnight ML research: a proposer edits train.py, the lab trains it for a fixed "
        "budget, measures val_bpb, keeps what helped and records everything.",
    )
    parser.add_argument("--version", action="version", version=f"autoresearch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "prepare",
        help="download (if needed), train the tokenizer and tokenize a corpus for a profile",
        description="Get a corpus ready for training: fetch it if it is remote, train the BPE tokenizer "
        "on its train split and tokenize train, val and test once, into the cache. Running it again "
        "does nothing.",
    )
    p.add_argument("--profile", default="cpu", choices=sorted(PROFILES),
                   help="compute profile whose sequence length and vocabulary to prepare for (default: cpu)")
    p.add_argument("--source", help="`default` (embedded, offline), `climbmix` (the reference's shards, "
                   "downloaded), or a directory of shards with train/ val/ [test/] subfolders "
                   "(default: the profile's own)")
    p.add_argument("--num-shards", type=int, help="climbmix training shards to download (default: 10)")
    p.add_argument("--cache-dir", help="where shards and prepared data live "
                   "(default: $AUTORESEARCH_CACHE or ~/.cache/autoresearch)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("profiles", help="list the compute profiles and their frozen constants")
    p.set_defaults(func=_cmd_profiles)

    p = sub.add_parser("init", help="make a workspace: a git repo with train.py and program.md for a profile",
                       description="Make a workspace for one research run: a git repository (or a new branch "
                       "autoresearch/TAG in an existing one) holding train.py and program.md, with the "
                       "profile's data prepared and the harness fingerprint recorded.")
    p.add_argument("dir", nargs="?", default=".", help="the workspace folder (default: here)")
    p.add_argument("--tag", help="run tag; the branch is autoresearch/TAG (default: today, e.g. nov24)")
    p.add_argument("--profile", default="cpu", choices=sorted(PROFILES), help="compute profile (default: cpu)")
    p.add_argument("--source", help="corpus, as for `prepare` (default: the profile's)")
    p.add_argument("--num-shards", type=int, help="climbmix training shards (default: 10)")
    p.add_argument("--budget", type=float, help="training seconds per trial (default: $AUTORESEARCH_TIME_BUDGET, "
                   "else the profile's)")
    p.add_argument("--trainer", help="start from this train.py instead of the template's")
    p.add_argument("--rule", choices=("noise", "strict"),
                   help="keep rule: `noise` keeps gains well above the noise floor; `strict` keeps any gain, "
                   "as the reference does (default: $AUTORESEARCH_RULE, else noise)")
    p.add_argument("--baseline-runs", type=int,
                   help="seeds of the baseline that estimate the noise (default: $AUTORESEARCH_BASELINE_RUNS, else 3)")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("baseline", help="run the unedited train.py under several seeds (the noise floor)")
    p.add_argument("workspace", nargs="?", help="workspace folder (default: the one around here)")
    p.add_argument("--unsandboxed", action="store_true", help=UNSANDBOXED_HELP)
    p.set_defaults(func=_cmd_baseline)

    p = sub.add_parser("trial", help="try the edit now in train.py: commit, train, measure, decide, record",
                       description="What a coding agent runs after editing train.py. The lab commits train.py, "
                       "trains it in a sandbox, scores it, keeps it or reverts it, and records it. Exits 1 when "
                       "the trial crashed (its reason and log are printed), 0 otherwise.")
    p.add_argument("-m", "--message", required=True, help="one line saying what the edit changes")
    p.add_argument("--proposer", default="agent", help="who made the edit, for the record (default: agent)")
    p.add_argument("workspace", nargs="?", help="workspace folder (default: the one around here)")
    p.add_argument("--unsandboxed", action="store_true", help=UNSANDBOXED_HELP)
    p.set_defaults(func=_cmd_trial)

    p = sub.add_parser("run", help="the loop: baseline, then propose, train, decide, record, until stopped",
                       description="Run the research loop. It resumes where it stopped: after Ctrl-C, kill -9 or "
                       "a reboot, run it again.")
    p.add_argument("workspace", nargs="?", help="workspace folder (default: the one around here)")
    p.add_argument("--proposer", help="who proposes the edits: search, agent, llm or scripted "
                   "(default: [run] proposer in the workspace's autoresearch.toml, else search)")
    p.add_argument("--script", help="for --proposer scripted: a JSON list of edits")
    p.add_argument("--agent", help="propose with this coding agent: claude, codex or aider (sets --proposer agent; "
                   "default: [agent] preset)")
    p.add_argument("--model", help="the model of the agent or the llm proposer (default: [agent] or [llm] model)")
    p.add_argument("--api", choices=("openai", "anthropic"), help="for --proposer llm: the API (default: [llm] api)")
    p.add_argument("--max-cost", type=float, help="for --proposer llm: stop once the API spend reaches this "
                   "many dollars (default: [llm] max_cost)")
    p.add_argument("--max-trials", type=int, help="stop after this many proposals (default: $AUTORESEARCH_MAX_TRIALS, "
                   "else [run] max_trials, else never)")
    p.add_argument("--max-hours", type=float, help="stop after this many hours")
    p.add_argument("--parallel", type=int, metavar="N", help="run up to N trials at once, one per GPU (or, without "
                   "a GPU, N CPU slots sharing its threads), each proposed in a git worktree of its own; the branch "
                   "stays on the best (default: [run] parallel, else every GPU, else 1)")
    p.add_argument("--gpus-per-trial", type=int, metavar="K", help="train each trial data-parallel on K GPUs of one "
                   "machine, under torchrun (train.py's TOTAL_BATCH_SIZE stays the total; a slot is K GPUs; default: "
                   "[run] gpus_per_trial, else 1)")
    p.add_argument("--executor", choices=("local", "ray"), help="where trials run: local (subprocesses on this "
                   "host) or ray (one Ray task per trial on a running Ray cluster's nodes, each slot a GPU of a node; "
                   "needs pip install 'autoresearch[ray]' on every node; default: [run] executor, else local)")
    p.add_argument("--address", help="for --executor ray: the cluster's address, host:port as `ray start --head` "
                   "prints it, or auto for the cluster this machine is part of (default: [run] address, else auto)")
    p.add_argument("--confirm-runs", type=int, help="after --max-trials or --max-hours: run the best and the baseline "
                   "this many times more under fresh seeds, and the best without each kept change once "
                   "(`autoresearch confirm`; default: [run] confirm_runs, else 3; 0: no confirmation)")
    p.add_argument("--unsandboxed", action="store_true", help=UNSANDBOXED_HELP)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("confirm", help="re-measure the best against the baseline with fresh seeds, and each kept change "
                       "undone alone", description="Run the baseline and the best again, in turn, under seeds "
                       "neither has run, and give the best's gain with its 95% interval from those runs alone; then "
                       "measure the best without each of its kept changes (ablation). `run` does this by itself when "
                       "it stops after --max-trials or --max-hours. Everything is recorded; `report` shows it.")
    p.add_argument("workspace", nargs="?", help="workspace folder (default: the one around here)")
    p.add_argument("--runs", type=int, default=3, help="runs of each, at least 3 (default: 3)")
    p.add_argument("--no-ablation", action="store_true", help="skip the leave-one-out ablation of the kept changes")
    p.add_argument("--unsandboxed", action="store_true", help=UNSANDBOXED_HELP)
    p.set_defaults(func=_cmd_confirm)

    p = sub.add_parser("status", help="the trial in flight, the best result, the noise floor and the latest trials")
    p.add_argument("workspace", nargs="?", help="workspace folder (default: the one around here)")
    p.add_argument("--last", type=int, default=15, help="trials to list (default: 15)")
    p.add_argument("--watch", action="store_true", help="redraw every few seconds until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between redraws (default: 2)")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("report", help="progress.png, report.html and a summary; scores the sealed test split once",
                       description="Write progress.png, a self-contained report.html and report.md (into "
                       "WORKSPACE/.autoresearch/report/ or --out) and print the summary.")
    p.add_argument("workspace", nargs="?", help="workspace folder (default: the one around here)")
    p.add_argument("--out", help="folder for the files (default: WORKSPACE/.autoresearch/report)")
    p.add_argument("--test-eval", choices=("auto", "never"), default="auto",
                   help="the sealed test split: auto (default) has the lab score the baseline's and the best's kept "
                   "checkpoints on it where not scored yet, sandboxed as a trial, unless a lab is running; never "
                   "reports what is cached")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("export", help="the best train.py, headed by the kept changes and their measured effect",
                       description="Write the best train.py (the head of the workspace's branch, as the lab decided it) "
                       "to FILE, or print it, headed by comments: the baseline's and the best's val_bpb, the kept "
                       "changes ranked by effect with their intervals, and the confirmation if one was run.")
    p.add_argument("workspace", nargs="?", help="workspace folder (default: the one around here)")
    p.add_argument("-o", "--out", help="the file to write (default: print to standard output)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("dashboard", help="a live page on 127.0.0.1 that follows the run")
    p.add_argument("workspace", nargs="?", help="workspace folder (default: the one around here)")
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default: 127.0.0.1; for a remote box use ssh -L)")
    p.add_argument("--open", action="store_true", help="open it in a browser")
    p.set_defaults(func=_cmd_dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, ValueError) as e:  # bad input or state: the message says what to do
        print(f"autoresearch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoresearch: interrupted", file=sys.stderr)
        return 130
