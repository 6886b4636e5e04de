"""`autoresearch report`: progress.png, a self-contained report.html and report.md, and the markdown
summary on the terminal.

Output goes to `--out`, or to `.autoresearch/report/` in the workspace. The lab checks, around
every trial, that nothing under `.autoresearch/` but the trial's own folder changed; the report
folder is one the lab leaves out of that check (its READER_PATHS), so a report made during a
trial does not fail it. The sealed-test cache is not: it is written only while no trial runs.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .data import RETRY_SECONDS, Analysis, ReportError, find_workspace, load
from .html import render_html
from .plots import render_progress
from .summary import TERMINAL_DIFF_LINES, markdown
from autoresearch.lab.workspace import READER_PATHS, Workspace

from .testeval import TestResult, sealed_test

REPORT_DIR = READER_PATHS[0]
FILES = ("progress.png", "report.html", "report.md")


@dataclass
class ReportResult:
    out_dir: Path
    files: dict[str, Path]
    markdown: str
    analysis: Analysis
    tests: list[TestResult] = field(default_factory=list)


class NoTrials(ReportError):
    """The workspace has no trial yet: nothing to report, which is not a failure to read it."""


def trial_running(ws: Workspace) -> bool:
    """Whether a trial is running now (a row the lab left `running` long ago does not count)."""
    try:
        return bool(load(ws, retry_seconds=2.0).live_running)
    except ReportError:
        return True  # unsure: behave as if one were


def make_report(workspace: str | Path | Workspace | None = None, out: str | Path | None = None, *,
                test_eval: str = "auto", log=print, retry_seconds: float = RETRY_SECONDS) -> ReportResult:
    """Write the report's files and return what was written. Raises ReportError when the workspace
    or its ledger cannot be read, and when the ledger holds no trial."""
    ws = workspace if isinstance(workspace, Workspace) else find_workspace(workspace)
    a = load(ws, retry_seconds)
    if not a.trials:
        raise NoTrials(f"The workspace {ws.root} has no trials yet, so there is nothing to report. "
                          f"Start the loop with `autoresearch run {ws.root}` (or `autoresearch baseline`).")
    may_write_cache = lambda: not trial_running(ws)  # noqa: E731
    tests = sealed_test(a, test_eval, log=log, may_write=may_write_cache)
    md = markdown(a, tests)
    with tempfile.TemporaryDirectory(prefix="autoresearch-report-") as tmp:
        staging = Path(tmp)
        render_progress(a, staging / "progress.png")
        (staging / "report.html").write_text(render_html(a, tests, staging / "progress.png"))
        (staging / "report.md").write_text(md)
        out_dir = Path(out).expanduser().resolve() if out is not None else ws.lab_dir / REPORT_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {}
        for name in FILES:
            target = out_dir / name
            tmp_target = out_dir / f".{name}.tmp"
            shutil.copyfile(staging / name, tmp_target)
            tmp_target.replace(target)
            files[name] = target
    return ReportResult(out_dir, files, md, a, tests)


def report(workspace: str | Path | None = None, out: str | Path | None = None, *, test_eval: str = "auto",
           stream=None) -> int:
    """What `autoresearch report [WORKSPACE] [--out DIR] [--test-eval auto|always|never]` does.

    Prints the markdown summary (diffs shortened) and where the files went. Returns 0, or 1 when
    the workspace has no trials yet. Raises ReportError (a LedgerVersionError too, for a ledger from
    a newer autoresearch) for a workspace or ledger it cannot read."""
    stream = stream or sys.stdout
    say = lambda m: print(m, file=stream, flush=True)  # noqa: E731
    try:
        result = make_report(workspace, out, test_eval=test_eval, log=lambda m: print(m, file=sys.stderr, flush=True))
    except NoTrials as e:
        print(f"autoresearch report: {e}", file=sys.stderr)
        return 1
    short = markdown(result.analysis, result.tests, max_diff_lines=TERMINAL_DIFF_LINES)
    say(short.rstrip("\n"))
    say("")
    say(f"report: {result.files['report.html']}")
    say(f"plot:   {result.files['progress.png']}")
    return 0
