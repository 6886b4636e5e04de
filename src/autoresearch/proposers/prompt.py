"""What a proposer is told: the protocol (program.md), where the research stands, and the task.

Shared by the agent and LLM proposers. Everything comes from the ProposalContext (the ledger's
history, the best commit, the noise floor) and the workspace's files, so a restarted run is told
exactly what an uninterrupted one would be. The text is deterministic (no clocks, no randomness)
and compact: the last `recent` trials in a table with their gains against the best at the time,
older ones in one line each, the ideas that crashed and why, the latest crash's traceback.
"""
from __future__ import annotations

import statistics
from importlib import resources
from pathlib import Path

from autoresearch.lab.ledger import Trial
from autoresearch.lab.proposer import ProposalContext

RECENT = 20  # trials shown in full
OLDER = 60  # earlier trials shown in one line each, most recent first
CRASHES = 10  # crashed ideas listed with their reasons
REASON_CHARS = 240
TAIL_LINES = 8  # lines of the latest crash's log shown

TASK_COMMON = """\
## Your task now

Propose ONE experiment: a single idea, as one edit of `train.py`, that you expect to lower val_bpb
given the history above. This run is driven by the lab, which overrides "How to run an experiment"
in the protocol: do NOT run `autoresearch trial`, do not train or run train.py, do not commit,
reset or otherwise touch git, and do not edit any file but `train.py`. The lab trains, measures,
decides and records your edit after you finish. Prefer an idea that has not been tried; do not
repeat one that was discarded unless you say what is different."""

AGENT_TASK = """\
{common}

Steps:
1. Read `train.py` (in the current folder, {workspace}).
2. Edit `train.py` in place to make your one change.
3. Write a one-line description of the change (for example `halve the batch size to 2**18`) to
   the file `{description_file}`, and print it as the last line of your answer too,
   in the form `DESCRIPTION: <one line>`.
Then stop."""

LLM_TASK = """\
{common}

The current `train.py` is below. Reply in the edit format given in your instructions."""


def protocol(workspace: Path) -> str:
    """The workspace's program.md (which its owner may have adapted), else the template's."""
    path = Path(workspace) / "program.md"
    if path.is_file():
        return path.read_text()
    return resources.files("autoresearch").joinpath("templates", "program.md").read_text()


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-".center(8)  # as wide as a number
    return f"{value:+.6f}" if signed else f"{value:.6f}"


def one_line(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _outcome(t: Trial) -> str:
    """What became of a candidate, in a few words, for the table."""
    d = t.decision or {}
    if t.status == "crash":
        return one_line(t.reason or "crashed", REASON_CHARS)
    if t.val_bpb is None:
        return one_line(t.reason or d.get("why", ""), REASON_CHARS)
    values = d.get("values") or []
    runs = f"mean of {len(values)} runs; " if len(values) > 1 else ""
    if "threshold" in d and "delta" in d:
        return f"{runs}needed a gain over {_num(d['threshold'])}"
    return one_line(runs + str(d.get("why", "")), REASON_CHARS)


def _gain(t: Trial) -> float | None:
    d = t.decision or {}
    return d.get("delta") if isinstance(d.get("delta"), (int, float)) else None


def _mean_value(t: Trial) -> float | None:
    return statistics.fmean(t.values) if t.values else None


def history_section(ctx: ProposalContext, recent: int = RECENT, older: int = OLDER) -> str:
    trials = list(ctx.history)
    baseline = [t for t in trials if t.kind == "baseline" and t.status == "keep" and t.val_bpb is not None]
    candidates = [t for t in trials if t.kind == "candidate" and t.status != "running"]
    out = ["## Where the research stands", ""]
    best = f"Best so far: commit {ctx.best_commit[:7]}, val_bpb {ctx.best_val_bpb:.6f}"
    if baseline:
        base = statistics.fmean(t.val_bpb for t in baseline)
        best += (f"; the baseline (unedited train.py) measured {base:.6f} over {len(baseline)} run(s), so the "
                 f"kept changes have gained {base - ctx.best_val_bpb:+.6f} in total")
    out.append(best + ".")
    if ctx.sigma is not None:
        out.append(f"Noise floor: sigma = {ctx.sigma:.6f} (the spread of val_bpb across seeds of the same code). "
                   "A change is kept only when its gain clears a threshold of a few sigma; smaller gains are "
                   "noise, and borderline ones are re-run under another seed.")
    else:
        out.append("Noise floor: not measured (one baseline run), so any gain at all is kept.")
    out.append(f"Training budget: {ctx.time_budget:g} s of wall clock per trial (profile {ctx.profile}); "
               "a change that makes each step slower trains for fewer steps.")
    counts = {s: sum(t.status == s for t in candidates) for s in ("keep", "discard", "crash")}
    out.append(f"Experiments so far: {len(candidates)} ({counts['keep']} kept, {counts['discard']} discarded, "
               f"{counts['crash']} crashed).")
    if not candidates:
        out += ["", "No experiments yet: this is the first one after the baseline."]
        return "\n".join(out)

    shown, earlier = candidates[-recent:] if recent > 0 else [], candidates[: -recent] if recent > 0 else candidates
    if earlier and older > 0:
        out += ["", f"Earlier experiments (most recent first{', the last ' + str(older) if len(earlier) > older else ''}):"]
        for t in reversed(earlier[-older:]):
            gain = _gain(t)
            note = f" (gain {gain:+.6f})" if gain is not None else ""
            out.append(f"- #{t.id} {t.status}{note}: {one_line(t.description, 100)}")
    out += ["", (f"Last {len(shown)} experiments, oldest first. gain = best val_bpb at the time minus this one's: "
                 "positive is better."), "",
            "| # | status | val_bpb | gain | description | outcome |", "|---|---|---|---|---|---|"]
    for t in shown:
        value, gain = _mean_value(t), _gain(t)
        out.append(f"| {t.id} | {t.status} | {_num(value)} | {_num(gain, signed=True)} | "
                   f"{one_line(t.description, 120).replace('|', '/')} | {_outcome(t).replace('|', '/')} |")

    crashed = [t for t in candidates if t.status == "crash"]
    listed = crashed[-CRASHES:]
    if listed:
        out += ["", "Ideas that crashed, and why (most recent last):"]
        for t in listed:
            out.append(f"- #{t.id} {one_line(t.description, 100)}: {one_line(t.reason or 'crashed', REASON_CHARS)}")
        tail = (listed[-1].trainer_summary or {}).get("log_tail", "")
        lines = [line for line in str(tail).splitlines() if line.strip()][-TAIL_LINES:]
        if lines:
            out += ["", f"The end of the latest crash's log (#{listed[-1].id}):", "```", *lines, "```"]
    return "\n".join(out)


def in_flight_section(ctx: ProposalContext) -> list[str]:
    """What the lab's other trial slots are measuring now: ideas not to propose a second time."""
    if not ctx.in_flight:
        return []
    lines = ["## Being tried right now", "", "Other experiments are running at the same time as yours. Do not "
             "propose the same idea again; a different one, or one that combines well with them, is worth more:", ""]
    return lines + [f"- {one_line(d, 160)}" for d in ctx.in_flight] + [""]


def build_prompt(ctx: ProposalContext, task: str, *, train_source: str | None = None, recent: int = RECENT) -> str:
    """program.md, the history, the task and (for an LLM) the current train.py, as one text."""
    parts = ["# The research protocol (program.md)", "", protocol(ctx.workspace).strip(), "",
             history_section(ctx, recent).strip(), "", *in_flight_section(ctx), task.strip()]
    if train_source is not None:
        parts += ["", "## The current train.py", "", "```python", train_source.rstrip("\n"), "```"]
    return "\n".join(parts) + "\n"


def agent_prompt(ctx: ProposalContext, description_file: str, recent: int = RECENT) -> str:
    task = AGENT_TASK.format(common=TASK_COMMON, workspace=ctx.workspace, description_file=description_file)
    return build_prompt(ctx, task, recent=recent)


def llm_prompt(ctx: ProposalContext, recent: int = RECENT, train_source: str | None = None) -> str:
    """The LLM's prompt, showing `train_source` (the text its edits will apply to; by default the
    workspace's train.py)."""
    if train_source is None:
        train_source = (Path(ctx.workspace) / "train.py").read_text()
    return build_prompt(ctx, LLM_TASK.format(common=TASK_COMMON), train_source=train_source, recent=recent)


def next_trial_id(ctx: ProposalContext) -> int:
    """The id the ledger will give the row recording this proposal (ids only grow, rows stay)."""
    return max((t.id for t in ctx.history), default=0) + 1
