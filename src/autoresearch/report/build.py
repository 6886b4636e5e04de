"""`autoresearch report`: progress.png, a self-contained report.html and report.md, and the markdown
summary on the terminal.

Output goes to `--out`, or to `.autoresearch/report/` in the workspace: a folder the lab never
reads and no trial can see, so a report may be made at any time, during a trial too. The report
reads the ledger and the sealed test's cache; it runs nothing (the CLI has the lab score the sealed
test first, lab.sealed).
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from autoresearch.lab.workspace import REPORT_DIR, Workspace

from .data import RETRY_SECONDS, Analysis, ReportError, find_workspace, load
from .html import render_html
from .plots import render_progress
from .sealed_results import TestResult, sealed_results
from .summary import TERMINAL_DIFF_LINES, markdown

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


def make_report(workspace: str | Path | Workspace | None = None, out: str | Path | None = None, *,
                retry_seconds: float = RETRY_SECONDS) -> ReportResult:
    """Write the report's files and return what was written. Raises ReportError when the workspace
    or its ledger cannot be read, and when the ledger holds no trial."""
    ws = workspace if isinstance(workspace, Workspace) else find_workspace(workspace)
    a = load(ws, retry_seconds)
    if not a.trials:
        raise NoTrials(f"The workspace {ws.root} has no trials yet, so there is nothing to report. "
                       f"Start the loop with `autoresearch run {ws.root}` (or `autoresearch baseline`).")
    tests = sealed_results(a)
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


def report(workspace: str | Path | None = None, out: str | Path | None = None, *, stream=None) -> int:
    """What `autoresearch report [WORKSPACE] [--out DIR]` does once the sealed test is scored.

    Prints the markdown summary (diffs shortened) and where the files went. Returns 0, or 1 when
    the workspace has no trials yet. Raises ReportError (a LedgerVersionError too, for a ledger from
    a newer autoresearch) for a workspace or ledger it cannot read."""
    stream = stream or sys.stdout
    say = lambda m: print(m, file=stream, flush=True)  # noqa: E731
    try:
        result = make_report(workspace, out)
    except NoTrials as e:
        print(f"autoresearch report: {e}", file=sys.stderr)
        return 1
    short = markdown(result.analysis, result.tests, max_diff_lines=TERMINAL_DIFF_LINES)
    say(short.rstrip("\n"))
    say("")
    say(f"report: {result.files['report.html']}")
    say(f"plot:   {result.files['progress.png']}")
    return 0
