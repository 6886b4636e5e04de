"""`autoresearch export`: the best train.py, headed by comments that say what made it the best.

The best is the lab's (decide.current_best, as the report shows it), read from git with `git show`;
nothing in the workspace changes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .data import Analysis, ReportError, load
from .summary import bpb, confirmation_lines, effect_uncertainty, signed


def header(a: Analysis, commit: str) -> list[str]:
    cfg = a.ws.config
    lines = [f"autoresearch export: the best train.py of {a.ws.root} (branch {cfg.get('branch', '?')}, commit "
             f"{commit[:12]}, profile {cfg.get('profile', '?')}, budget {a.time_budget or 0:g}s)",
             f"baseline val_bpb {bpb(a.baseline_mean)} over {len(a.baseline_values)} run(s); best {bpb(a.best_mean)} over "
             f"{len(a.best_values)} run(s)" + (f"; improvement {signed(a.improvement)}" if a.improvement is not None else "")]
    if a.kept_changes:
        lines.append("kept changes, by measured effect (val_bpb gain over the best before them):")
        lines += [f"  {signed(k.delta)}{effect_uncertainty(k)}  trial {k.trial.id}  {k.trial.description}"
                  for k in a.kept_changes]
    else:
        lines.append("no change has been kept: this is the baseline")
    lines += [line.removeprefix("- ") for line in confirmation_lines(a)]
    return lines


def export(workspace: str | Path | None = None, out: str | Path | None = None, stream=None) -> int:
    """What `autoresearch export [WORKSPACE] [-o FILE]` does: write the best train.py to FILE, or print it."""
    a = load(workspace)
    commit = a.best_commit or a.baseline_commit
    if commit is None:
        raise ReportError(f"The workspace {a.ws.root} has no measured train.py yet: run `autoresearch run` first.")
    proc = subprocess.run(["git", "show", f"{commit}:train.py"], cwd=a.ws.root, capture_output=True, text=True,
                          env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    if proc.returncode != 0:
        raise ReportError(f"`git show {commit[:12]}:train.py` failed in {a.ws.root}: {proc.stderr.strip()}")
    text = "".join(f"# {line}\n" for line in header(a, commit)) + "\n" + proc.stdout
    if out is None:
        (stream or sys.stdout).write(text)
    else:
        Path(out).write_text(text)
        print(f"wrote {out}: the best train.py ({commit[:12]}), {len(a.kept_changes)} kept change(s)", file=sys.stderr)
    return 0
