"""The report: progress.png, report.html and the markdown summary, made from a real small workspace
(the real loop, the tiny real trainer, scripted edits), and `autoresearch report`, which has the lab
score the sealed test first (lab.sealed: test_sealed.py) and then reads.

The workspace is made once per session by the `research_workspace` fixture (conftest.py) and shared
with test_status.py, test_dashboard.py and test_lab_loop.py; tests that change it work on a copy
(`workspace_copy`). Its rows depend on the noise the loop measured (reruns, the best measured again),
so every expectation here is derived from the ledger and from the lab's own functions
(report_helpers.ledger_trials: Lab.best, Lab.noise), never from fixed trial ids.
How a diff reads on the page is checked in headless Chromium, as the dashboard is (test_dashboard.py).
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from autoresearch.cli import main
from autoresearch.lab.decide import VALUE_KINDS, current_best
from autoresearch.lab.ledger import ADDED_COLUMNS, SCHEMA_VERSION, Ledger, LedgerVersionError
from autoresearch.lab.noise import gain_interval, workspace_noise
from autoresearch.lab.outcomes import Failure, Kind, Status
from lab_helpers import make_workspace
from report_helpers import (  # noqa: F401 (browser: a fixture)
    add_trial, browser, ledger_trials, running_trial_with_progress, scripted, set_budget, start_trial, the_kept_gain,
    two_slot_run, wait_for)

COUNTED = (Status.KEEP, Status.DISCARD, Status.CRASH)  # a candidate's outcomes that the keep rate counts


def candidates(trials, *statuses):
    return [t for t in trials if t.kind == Kind.CANDIDATE and (not statuses or t.status in statuses)]


def baseline_values(trials, base_commit):
    """The baseline's runs, as the lab counts a commit's runs (decide.VALUE_KINDS)."""
    return [t.val_bpb for t in trials
            if t.commit_sha == base_commit and t.kind in VALUE_KINDS and t.status == Status.KEEP]


def latest_run_of(trials, commit):
    return [t for t in trials if t.commit_sha == commit and t.status == Status.KEEP and t.val_bpb is not None][-1]


def files_of(root) -> dict:
    """Every file of a workspace by content, but the report's own folder and SQLite's -wal and -shm beside the
    ledger (a reader of a WAL database makes them where its last writer's close removed them; they hold no row)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and ".autoresearch/report" not in str(p.relative_to(root))
            and not p.name.endswith(("ledger.db-wal", "ledger.db-shm"))}


def test_autoresearch_report_scores_the_sealed_test_then_writes_a_plot_a_page_and_a_summary(
        workspace_copy, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(workspace_copy), "--out", str(out)]) == 0
    printed, said = capsys.readouterr()

    trials, lab = ledger_trials(workspace_copy)
    best, noise = lab.best, lab.noise
    base = baseline_values(trials, lab.base_commit)
    base_mean = statistics.fmean(base)
    se = noise.sigma * (1 / len(base) + 1 / len(best.values)) ** 0.5
    interval = gain_interval(base, best.values, noise)
    kept = the_kept_gain(trials)
    (crashed,) = [t for t in trials if t.status == Status.CRASH]
    counted = candidates(trials, *COUNTED)

    # the numbers: the lab's best and noise, the improvement with its standard error and interval
    assert f"val_bpb **{base_mean:.6f}** over {len(base)} run(s)" in printed
    assert f"**best** `{best.commit[:7]}`: val_bpb **{best.mean:.6f}** over {len(best.values)} run(s)" in printed
    assert f"**improvement**: {base_mean - best.mean:+.6f} bpb" in printed
    assert f"± {se:.6f} (1 SE = σ·√(1/{len(base)} + 1/{len(best.values)})" in printed
    assert f"95% interval {interval.low:+.6f} to {interval.high:+.6f}" in printed
    assert f"σ = {noise.sigma:.6f} with {noise.df} df" in printed
    assert f"gains under {lab.detectable_gain:.4g} are invisible here" in printed
    assert "lengthen the budget or allow more runs" in printed
    assert f"keep rate: 1/{len(counted)} candidates ({100 / len(counted):.0f}%)" in printed  # the gain alone
    assert "CPU-hours" in printed and "GPU-hours" not in printed
    assert re.search(r"pace: [\d.]+ trials per hour", printed)
    assert "hardware: " in printed and "(cpu)" in printed
    run = latest_run_of(trials, best.commit)
    assert f"throughput of the best: {run.tokens_per_second:,.0f} tokens/s, MFU n/a (trial {run.id})" in printed
    assert "0.0%" not in printed  # a CPU: no MFU
    # kept changes ranked, with the interval their decision recorded, and their diff; crashes grouped by failure
    assert (f"1. **{kept.decision['delta']:+.6f}** bpb, 95% interval {kept.decision['low']:+.6f} to "
            f"{kept.decision['high']:+.6f} — trial {kept.id}") in printed
    assert "LR 0.003 -> 0.03" in printed and "+LR = 0.03" in printed and "-LR = 0.003" in printed
    assert f"- **{crashed.failure}** (1): trials {crashed.id}" in printed and "ZeroDivisionError" in printed

    # the sealed test: the lab scored both commits, once, from a run of each that won no comparison
    cache = json.loads((workspace_copy / ".autoresearch" / "test-eval.json").read_text())
    assert cache["version"] == 1 and set(cache["results"]) == {lab.base_commit, best.commit}
    for commit in (lab.base_commit, best.commit):
        entry = cache["results"][commit]
        runs = [t for t in trials if t.commit_sha == commit and t.status == Status.KEEP]
        fresh = [t for t in runs if t.kind not in (Kind.CANDIDATE, Kind.RERUN)]
        assert entry["trial"] == (fresh or runs)[0].id and entry["sandboxed"] is True
    assert said.count("on the sealed test split") == 2
    base_test, best_test = (cache["results"][c]["test_bpb"] for c in (lab.base_commit, best.commit))
    assert 0 < best_test < base_test  # a tenfold learning rate helps on the sealed split too
    assert f"sealed test, baseline `{lab.base_commit[:7]}`: **{base_test:.6f}**" in printed
    assert f"sealed test, best `{best.commit[:7]}`: **{best_test:.6f}**" in printed

    # the files
    png = (out / "progress.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 1200 and height >= 600
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," + base64.b64encode(png).decode()[:200] in page  # the plot, inlined
    assert "<style>" in page and "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from anywhere
    assert "LR 0.003 -&gt; 0.03" in page and "+LR = 0.03" in page and "ZeroDivisionError" in page
    assert "MFU n/a" in page
    assert f"{best_test:.6f}" in page
    assert f"{noise.df} df" in page and f"gains under {lab.detectable_gain:.4g} are invisible here" in page
    assert f"95% interval {kept.decision['low']:+.6f} to {kept.decision['high']:+.6f}" in page
    assert (out / "report.md").read_text().startswith("# autoresearch report: test")

    # a second report reads the cache and scores nothing
    before = (workspace_copy / ".autoresearch" / "test-eval.json").read_bytes()
    assert main(["report", str(workspace_copy), "--out", str(out)]) == 0
    printed, said = capsys.readouterr()
    assert "sealed test split" not in said
    assert (workspace_copy / ".autoresearch" / "test-eval.json").read_bytes() == before
    assert f"**{best_test:.6f}**" in printed


def test_the_report_goes_into_the_workspace_by_default_and_test_eval_never_scores_nothing(workspace_copy, capsys):
    assert main(["report", str(workspace_copy), "--test-eval", "never"]) == 0
    folder = workspace_copy / ".autoresearch" / "report"
    assert sorted(p.name for p in folder.iterdir()) == ["progress.png", "report.html", "report.md"]
    printed, said = capsys.readouterr()
    assert f"report: {folder / 'report.html'}" in printed
    assert "not scored yet: `autoresearch report` scores it when no lab is running" in printed
    assert not (workspace_copy / ".autoresearch" / "test-eval.json").exists() and said == ""


def test_the_report_reads_and_writes_nothing_but_its_own_files(workspace_copy):
    """The ledger, the trials' folders, git, the sealed-test cache: a report leaves every byte as it was."""
    from autoresearch.report import report

    before = files_of(workspace_copy)
    assert report(workspace_copy) == 0
    assert files_of(workspace_copy) == before


def test_while_a_lab_holds_the_workspace_the_report_shows_what_is_cached(workspace_copy, capsys):
    from autoresearch.lab.workspace import Workspace

    ws = Workspace.open(workspace_copy)
    with ws.lock("run"):
        assert main(["report", str(workspace_copy)]) == 0
    printed, said = capsys.readouterr()
    assert "holds the workspace; the sealed test is scored when the lab is idle" in said
    assert "autoresearch run" in said  # who holds it
    assert "not scored yet" in printed and not (workspace_copy / ".autoresearch" / "test-eval.json").exists()


def no_sandbox_here(monkeypatch, tmp_path):
    """As on a machine without bubblewrap."""
    from autoresearch.lab import sandbox

    monkeypatch.setenv("AUTORESEARCH_BWRAP", str(tmp_path / "no-bwrap"))
    sandbox.check.cache_clear()  # no answer remembered from a sandbox found before


def test_without_a_sandbox_the_sealed_test_is_refused_with_the_ways_on(workspace_copy, tmp_path, monkeypatch, capsys):
    no_sandbox_here(monkeypatch, tmp_path)
    assert main(["report", str(workspace_copy)]) == 2
    said = capsys.readouterr().err
    assert "No bubblewrap (bwrap) was found" in said
    assert "[run] unsandboxed = true" in said and "--test-eval never" in said
    assert not (workspace_copy / ".autoresearch" / "test-eval.json").exists()
    assert not (workspace_copy / ".autoresearch" / "report").exists()
    assert main(["report", str(workspace_copy), "--test-eval", "never"]) == 0  # one of the ways on


def test_a_workspace_that_says_unsandboxed_has_its_sealed_test_scored_without_one(
        workspace_copy, tmp_path, monkeypatch, capsys):
    no_sandbox_here(monkeypatch, tmp_path)
    settings = workspace_copy / "autoresearch.toml"
    settings.write_text(settings.read_text().replace("[run]\n", "[run]\nunsandboxed = true\n", 1))
    assert main(["report", str(workspace_copy)]) == 0
    assert "unsandboxed as asked" in capsys.readouterr().err
    cache = json.loads((workspace_copy / ".autoresearch" / "test-eval.json").read_text())["results"]
    assert cache and all(e["sandboxed"] is False for e in cache.values())  # marked, as unsandboxed trials are
    assert all(e.get("test_bpb", 0) > 0 for e in cache.values())


def test_no_module_of_the_report_imports_what_runs_a_trial():
    """The report reads: importing all of it loads neither the trial, the supervisor, the sandbox nor the
    loop, nor torch."""
    code = ("import sys\n"
            "import autoresearch.report.build, autoresearch.report.dashboard, autoresearch.report.data\n"
            "import autoresearch.report.html, autoresearch.report.plots, autoresearch.report.sealed_results\n"
            "import autoresearch.report.status, autoresearch.report.summary\n"
            "print(sorted(m for m in sys.modules if m in ('torch', 'autoresearch.lab.trial', "
            "'autoresearch.lab.supervisor', 'autoresearch.lab.sandbox', 'autoresearch.lab.loop')))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_analysis_is_the_labs_own_view_of_the_ledger(research_workspace):
    """The best, its runs and the noise come from the lab's functions (Lab.best, Lab.noise); the running
    best at every row is the lab's best of the ledger up to that row."""
    from autoresearch.lab.loop import NOISE_SINCE
    from autoresearch.report.data import NOISE_SINCE as READ_SINCE
    from autoresearch.report.data import load

    assert READ_SINCE == NOISE_SINCE
    a = load(research_workspace)
    trials, lab = ledger_trials(research_workspace)
    assert a.device_class == lab.device_class
    assert a.best_commit == lab.best.commit and a.best_values == lab.best.values
    assert a.noise == lab.noise and (a.sigma, a.sigma_df) == (lab.noise.sigma, lab.noise.df)
    assert a.detectable_gain == pytest.approx(lab.detectable_gain)
    assert a.baseline_values == baseline_values(trials, lab.base_commit)
    expected = {}
    for n, t in enumerate(trials):
        best = current_best(trials[:n + 1], lab.device_class)
        expected[t.id] = best.mean if best else None
    assert a.running_best == pytest.approx(expected)
    kept = candidates(trials, Status.KEEP)
    assert [k.trial.id for k in a.kept_changes] == [t.id for t in kept]
    for change in a.kept_changes:  # the gain, with the interval its decision recorded
        decision = change.trial.decision
        assert (change.delta, change.low, change.high) == (decision["delta"], decision["low"], decision["high"])
    loss = scripted(trials, 1)
    assert loss.status == Status.DISCARD and a.delta_of(loss) == pytest.approx(loss.decision["delta"])
    assert a.delta_of(loss) < 0
    assert a.keep_rate == pytest.approx(len(kept) / len(candidates(trials, *COUNTED)))
    crashes = [t for t in trials if t.status == Status.CRASH]
    assert [(name, [t.id for t in group]) for name, group in a.crash_groups()] == [("exit", [t.id for t in crashes])]
    assert [t.failure for t in crashes] == [Failure.EXIT]
    assert a.accelerator == "CPU" and a.compute_seconds > 2.0 * len([t for t in trials if t.val_bpb is not None])


def test_in_a_new_noise_epoch_sigma_and_the_best_are_of_that_epoch(workspace_copy):
    """Where the lab found the measurement changed (ledger meta noise_since), the noise and the best's runs
    count from there, as the lab's do; before the best has a run there, its earlier runs stand for it."""
    from autoresearch.lab.loop import NOISE_SINCE
    from autoresearch.report.data import load, sigma_text
    from autoresearch.report.summary import markdown

    trials, lab = ledger_trials(workspace_copy)
    best_runs = [t for t in trials if t.commit_sha == lab.best.commit and t.status == Status.KEEP]
    since = best_runs[1].id  # the epoch starts at the best's second run
    ledger = Ledger(workspace_copy / ".autoresearch" / "ledger.db")
    ledger.set_meta(NOISE_SINCE, since)
    ledger.close()
    a, (_, lab) = load(workspace_copy), ledger_trials(workspace_copy)
    assert a.since == since and a.noise == workspace_noise(trials, lab.device_class, lab.rule, since) == lab.noise
    assert a.best_values == lab.best.values == [t.val_bpb for t in best_runs[1:]]
    assert a.running_best[trials[-1].id] == pytest.approx(lab.best.mean)
    assert f"since trial {since}" in sigma_text(a) and f"since trial {since}" in markdown(a, [])

    ledger = Ledger(workspace_copy / ".autoresearch" / "ledger.db")
    ledger.set_meta(NOISE_SINCE, trials[-1].id + 1)  # an epoch with no run in it yet
    ledger.close()
    a = load(workspace_copy)
    assert a.sigma is None and a.detectable_gain is None
    assert a.best_commit == lab.best.commit and a.best_values == [t.val_bpb for t in best_runs]
    assert f"σ unknown: no commit has two runs since trial {trials[-1].id + 1}" in markdown(a, [])


def test_crashes_are_grouped_by_failure_and_trials_run_again_are_no_crashes(workspace_copy, tmp_path):
    """A crash's group is its failure, whatever its reason says; a stopped or lost trial (run again) and an
    empty proposal are neither crashes nor candidates of the keep rate, and are listed as what they are."""
    from autoresearch.report.data import load
    from autoresearch.report.html import render_html
    from autoresearch.report.summary import markdown

    trials, _ = ledger_trials(workspace_copy)
    exits = [t.id for t in trials if t.status == Status.CRASH]
    oom = add_trial(workspace_copy, Status.CRASH, failure=Failure.OOM, description="wider model",
                    reason="CUDA out of memory while allocating 2.0 GiB")
    unnamed = add_trial(workspace_copy, Status.CRASH, description="odd one",
                        reason="the trial's supervisor ended without a result")
    stopped = add_trial(workspace_copy, Status.STOPPED, description="deeper model",
                        reason="stopped: the lab was told to stop during this trial")
    lost = add_trial(workspace_copy, Status.LOST, description="longer warm-down", reason="its worker went away")
    empty = add_trial(workspace_copy, Status.EMPTY, description="nothing at all",
                      reason="no change: the proposal edited nothing")
    a = load(workspace_copy)
    assert [(name, [t.id for t in group]) for name, group in a.crash_groups()] == \
        [("exit", exits), ("oom", [oom]), ("unknown", [unnamed])]
    assert [t.id for t in a.crashes] == [*exits, oom, unnamed]
    counted = [t.id for t in candidates(trials, *COUNTED)] + [oom, unnamed]
    kept = len(candidates(trials, Status.KEEP))
    assert [t.id for t in a.counted_candidates] == counted and a.keep_rate == pytest.approx(kept / len(counted))
    count = Counter(t.status for t in trials) + Counter([Status.CRASH, Status.CRASH, Status.STOPPED, Status.LOST,
                                                         Status.EMPTY])
    assert a.tally() == [(s, count[s]) for s in (Status.KEEP, Status.DISCARD, Status.CRASH, Status.STOPPED,
                                                 Status.LOST, Status.EMPTY)]

    text = markdown(a, [])
    assert (f"status {count[Status.KEEP]} keep, {count[Status.DISCARD]} discard, {count[Status.CRASH]} crash, "
            "1 stopped, 1 lost, 1 empty") in text
    assert (f"keep rate: {kept}/{len(counted)} candidates ({100 * kept / len(counted):.0f}%); not counted: 1 stopped, "
            "1 empty, 1 lost") in text
    assert f"- **oom** (1): trials {oom}" in text and "CUDA out of memory while allocating 2.0 GiB" in text
    assert f"- **unknown** (1): trials {unnamed}" in text
    crashes = text[text.index("## Crashes"):]
    assert "deeper model" not in crashes and "longer warm-down" not in crashes and "nothing at all" not in crashes

    page = render_html(a, [], None)
    crash_section = page[page.index("<h2>Crashes"):page.index("<h2>All trials")]
    assert "deeper model" not in crash_section and "wider model" in crash_section
    for trial_id, status in ((stopped, "stopped"), (lost, "lost"), (empty, "empty"), (oom, "crash")):
        assert re.search(rf'<tr><td class=num>{trial_id}</td>.*?<td class="status {status}">{status}</td>', page), status
    assert f'<div class="label">crashes</div><div class="value">{count[Status.CRASH]}</div>' in page


def test_an_older_ledger_reads_with_its_crashes_grouped_by_their_reason_and_its_gains_in_standard_errors(
        workspace_copy):
    """A ledger of schema 1 has no failure or device column, and its decisions no interval: its crashes are
    grouped by the failure their reason names (`exit: ...`, `OOM: ...`, as the lab then wrote them), all its
    trials count as one device, and a kept change's effect is given in standard errors."""
    from autoresearch.report.data import load
    from autoresearch.report.summary import markdown

    trials, lab = ledger_trials(workspace_copy)
    kept, discarded = the_kept_gain(trials), scripted(trials, 1)
    exits = [t.id for t in trials if t.status == Status.CRASH]
    old_decision = {k: v for k, v in kept.decision.items() if k not in ("low", "high")}
    db = sqlite3.connect(workspace_copy / ".autoresearch" / "ledger.db")
    for column in ADDED_COLUMNS:
        db.execute(f"ALTER TABLE trials DROP COLUMN {column}")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.execute("UPDATE trials SET reason = 'OOM: CUDA out of memory', status = 'crash' WHERE id = ?", (discarded.id,))
    db.execute("UPDATE trials SET reason = 'exit: ' || reason WHERE status = 'crash' AND id != ?", (discarded.id,))
    db.execute("UPDATE trials SET decision = ? WHERE id = ?", (json.dumps(old_decision), kept.id))
    db.commit()
    db.close()
    a = load(workspace_copy)
    assert [(name, [t.id for t in group]) for name, group in a.crash_groups()] == \
        [("exit", exits), ("oom", [discarded.id])]
    assert a.device_class is None and a.best_commit == lab.best.commit and a.sigma is not None
    change = a.kept_changes[0]
    assert change.low is None and change.se == pytest.approx(
        kept.decision["sigma"] * (1 / len(kept.decision["best_values"]) + 1 / len(change.values)) ** 0.5)
    assert f"1. **{kept.decision['delta']:+.6f}** bpb, {change.z:.1f} SE — trial {kept.id}" in markdown(a, [])


def test_a_diff_in_the_page_reads_like_git_diff(browser, research_workspace):
    """One line on the page per line of the diff, coloured or not, and no blank line after a coloured one."""
    from autoresearch.report.data import load
    from autoresearch.report.html import render_html

    a = load(research_workspace)
    the_kept_gain(a.trials)
    diff = a.kept_changes[0].trial.diff.rstrip("\n")
    assert any(line.startswith(("-", "+", "@@")) for line in diff.splitlines())
    page = browser.new_page()
    page.set_content(render_html(a, [], None))
    assert page.inner_text("pre.diff") == diff
    line_height = page.locator("pre.diff span.hunk").bounding_box()["height"]
    text_height = page.evaluate("document.querySelector('pre.diff').clientHeight") - 16  # less its padding
    assert text_height == pytest.approx(len(diff.splitlines()) * line_height, abs=line_height / 2)
    page.close()


def test_a_newer_ledgers_device_names_and_mfu_are_shown(workspace_copy):
    """Rows of a GPU machine, as the lab now records them: the device by name, and its MFU."""
    from autoresearch.report.data import load
    from autoresearch.report.summary import markdown

    ledger = Ledger(workspace_copy / ".autoresearch" / "ledger.db")
    for t in ledger.trials():
        ledger.update(t.id, hardware={"device": "cuda", "name": "NVIDIA H100 80GB HBM3", "gpus": [0]},
                      mfu_percent=39.8, tokens_per_second=1.6e6)
    ledger.close()
    trials, lab = ledger_trials(workspace_copy)
    a = load(workspace_copy)
    assert a.hardware_text == "NVIDIA H100 80GB HBM3 (cuda)" and a.accelerator == "GPU"
    run = latest_run_of(trials, lab.best.commit)
    assert f"throughput of the best: 1,600,000 tokens/s, MFU 39.8% (trial {run.id})" in markdown(a, [])


def test_a_trial_left_running_by_a_dead_lab_does_not_stretch_the_pace(workspace_copy):
    """Read hours after the lab died, a row it left running neither runs nor makes the run look slower."""
    from autoresearch.report.data import Analysis, find_workspace, read_ledger

    ws = find_workspace(workspace_copy)
    before = read_ledger(ws.ledger_path)
    last_end = max(t.ended_at for t in before.trials if t.ended_at)
    stale = add_trial(workspace_copy, Status.RUNNING, description="killed with the lab", started_at=last_end + 1)
    later = last_end + 6 * 3600
    a = Analysis(ws, read_ledger(ws.ledger_path).trials, before.meta, later)
    assert [t.id for t in a.stale_running] == [stale] and a.live_running == []
    assert a.span_seconds == pytest.approx(last_end - min(t.started_at for t in before.trials))
    assert a.trials_per_hour == pytest.approx(len(before.trials) / (a.span_seconds / 3600))


# --- bad input ------------------------------------------------------------------------------------------
def test_a_workspace_without_trials_is_reported_as_such(tmp_path, cpu_prepared, capsys):
    ws = make_workspace(tmp_path / "empty", cpu_prepared)
    assert main(["report", str(ws.root)]) == 1
    err = capsys.readouterr().err
    assert "has no trials yet" in err and "autoresearch run" in err
    assert not (ws.root / ".autoresearch" / "report").exists()
    assert not ws.ledger_path.exists()  # nothing to score made no ledger either


def test_a_folder_that_is_no_workspace_is_refused(tmp_path, capsys):
    from autoresearch.report import ReportError, report

    with pytest.raises(ReportError, match="not inside an autoresearch workspace"):
        report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "not inside an autoresearch workspace" in capsys.readouterr().err


def test_a_ledger_from_a_newer_autoresearch_is_refused_clearly(workspace_copy):
    from autoresearch.report import LedgerTooNew, report

    db = sqlite3.connect(workspace_copy / ".autoresearch" / "ledger.db")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (json.dumps(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(LedgerTooNew, match="newer autoresearch") as caught:
        report(workspace_copy)
    assert isinstance(caught.value, LedgerVersionError)  # the CLI already prints these as errors


def test_reading_waits_out_a_locked_ledger_then_gives_up_clearly(workspace_copy):
    from autoresearch.report.data import LedgerBusy, read_ledger

    path = workspace_copy / ".autoresearch" / "ledger.db"
    rows = len(ledger_trials(workspace_copy)[0])
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")  # the one way to lock readers out of a WAL database
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("UPDATE meta SET value = value WHERE key = 'schema_version'")
    holder.execute("COMMIT")
    started = time.monotonic()
    with pytest.raises(LedgerBusy, match="stayed locked for 0.5s"):
        read_ledger(path, retry_seconds=0.5)
    assert time.monotonic() - started < 5

    def release():
        time.sleep(0.6)
        holder.close()  # in WAL mode an exclusive locking mode ends only with the connection

    thread = threading.Thread(target=release)
    thread.start()
    assert len(read_ledger(path, retry_seconds=10).trials) == rows  # retried until the lock went
    thread.join()


REPORT_IN_A_PROCESS = """
import sys
from autoresearch.report import report
sys.exit(report(sys.argv[1], sys.argv[2]))
"""


def test_a_report_neither_blocks_nor_breaks_a_writer_holding_a_transaction(workspace_copy, tmp_path):
    discarded = scripted(ledger_trials(workspace_copy)[0], 1)
    ledger = Ledger(workspace_copy / ".autoresearch" / "ledger.db")
    ledger.db.execute("BEGIN IMMEDIATE")
    ledger.db.execute("UPDATE trials SET description = 'renamed in flight' WHERE id = ?", (discarded.id,))
    before = (workspace_copy / ".autoresearch" / "ledger.db").read_bytes()
    proc = subprocess.run([sys.executable, "-c", REPORT_IN_A_PROCESS, str(workspace_copy), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "out" / "report.html").read_text()
    assert "DIM 32 -&gt; 2" in page and "renamed in flight" not in page  # the committed state
    assert (workspace_copy / ".autoresearch" / "ledger.db").read_bytes() == before
    ledger.db.execute("COMMIT")  # the writer goes on as if nobody had read
    assert ledger.trial(discarded.id).description == "renamed in flight"
    ledger.close()
    assert next(t for t in ledger_trials(workspace_copy)[0] if t.id == discarded.id).description == "renamed in flight"


def test_a_report_made_during_a_trial_leaves_the_trial_alone(workspace_copy, capsys):
    """A report may be made while the lab runs a trial: the trial goes on unharmed, and the sealed test
    waits for the lab to be idle (it would share the device)."""
    set_budget(workspace_copy, 4.0)
    proc = start_trial(workspace_copy, "SEED = 0", "SEED = 1", "seed 0 -> 1")
    try:
        trial_id = wait_for(lambda: running_trial_with_progress(workspace_copy), what="a running trial")
        assert main(["report", str(workspace_copy)]) == 0
        printed, said = capsys.readouterr()
        assert "the sealed test is scored when the lab is idle" in said
        assert "not scored yet" in printed
    finally:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    trial = next(t for t in ledger_trials(workspace_copy)[0] if t.id == trial_id)  # reruns may follow it
    assert trial.status in (Status.KEEP, Status.DISCARD), trial.reason
    assert (workspace_copy / ".autoresearch" / "report" / "report.html").is_file()
    assert not (workspace_copy / ".autoresearch" / "test-eval.json").exists()


def test_export_writes_the_best_train_py_headed_by_what_made_it_the_best(research_workspace, tmp_path):
    from autoresearch.lab.decide import current_best
    from autoresearch.lab.workspace import git

    out = tmp_path / "best_train.py"
    proc = subprocess.run([sys.executable, "-m", "autoresearch", "export", str(research_workspace), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    trials, _ = ledger_trials(research_workspace)
    best = current_best(trials).commit
    text = out.read_text()
    header, body = text.split("\n\n", 1)
    assert body == git(research_workspace, "show", f"{best}:train.py", strip=False)
    assert all(line.startswith("# ") for line in header.splitlines())
    assert best[:12] in header and "baseline val_bpb" in header
    kept = [t for t in trials if t.kind == "candidate" and t.status == "keep"]
    assert all(t.description in header for t in kept)
    compile(text, "best_train.py", "exec")  # still a script that runs


# --- trial slots -----------------------------------------------------------------------------------------
RUN_START = 1_700_000_000.0


def slotted_analysis(tmp_path, data, *, lost: bool = False, read_at: float = RUN_START + 3600):
    """report_helpers.two_slot_run in a fresh workspace, read at `read_at` (an hour into the run)."""
    from autoresearch.report.data import Analysis, find_workspace, read_ledger

    ws = make_workspace(tmp_path / "slotted", data)
    ids = two_slot_run(ws.root, RUN_START, lost=lost)
    ledger = read_ledger(ws.ledger_path)
    return Analysis(find_workspace(ws.root), ledger.trials, ledger.meta, read_at), ids


def test_the_report_reads_the_slots_the_lab_records():
    from autoresearch.lab.loop import SLOTS
    from autoresearch.report.data import SLOTS as READ_SLOTS

    assert READ_SLOTS == SLOTS


def test_each_slot_is_busy_for_the_time_its_trials_ran_and_counts_gpu_hours_by_its_gpus(tmp_path, cpu_prepared):
    """Slot 0 (one GPU) ran trials 0-1200 s and 1200-3000 s and runs one since 3000 s; slot 1 (two GPUs of a
    Ray node) ran one 600-2400 s. Read at 3600 s: busy 100% and 50%, 1.0 GPU-hours each (slot 1's half
    hour on two GPUs), 2 and 1 trials finished per hour, the slots 75% busy together."""
    from autoresearch.report.data import Analysis, SlotState, read_ledger
    from autoresearch.report.html import render_html
    from autoresearch.report.summary import markdown

    a, ids = slotted_analysis(tmp_path, cpu_prepared)
    assert a.slots_recorded and a.several_slots and a.run_started == RUN_START
    assert a.run_span_seconds == pytest.approx(3600)
    zero, one = a.slots
    assert (zero.index, zero.state, zero.running.id) == (0, SlotState.RUNNING, ids["running"])
    assert (one.index, one.state, one.running) == (1, SlotState.IDLE, None)
    assert [t.id for t in zero.trials] == [ids["baseline"], ids["discarded"], ids["running"]]
    assert [t.id for t in one.trials] == [ids["other"]]
    assert (zero.busy_seconds, one.busy_seconds) == (pytest.approx(3600), pytest.approx(1800))
    assert (zero.busy_fraction, one.busy_fraction) == (pytest.approx(1.0), pytest.approx(0.5))
    assert (zero.device_hours, one.device_hours) == (pytest.approx(1.0), pytest.approx(1.0))
    assert (zero.trials_per_hour, one.trials_per_hour) == (pytest.approx(2.0), pytest.approx(1.0))
    assert a.slots_busy_fraction == pytest.approx(0.75)
    assert a.accelerator == "GPU" and a.device_hours == pytest.approx(2.0)
    assert (zero.where, one.where) == ("GPU 0 (NVIDIA H100 80GB HBM3)", "GPUs 0, 1 (2x NVIDIA H100 80GB HBM3) on node-b")

    text = markdown(a, [])
    assert "2.00 GPU-hours (trial wall time × the GPUs of its slot: 2h00m)" in text
    assert "- slots: 2, busy 75% of the run's 1h00m" in text
    assert ("  - slot 0, GPU 0 (NVIDIA H100 80GB HBM3): busy 100%, 2 trial(s) finished (2.0 per hour), 1.00 GPU-hours; "
            f"now running trial {ids['running']}: deeper model, 10m00s, step 340 (45%)") in text
    assert ("  - slot 1, GPUs 0, 1 (2x NVIDIA H100 80GB HBM3) on node-b: busy 50%, 1 trial(s) finished (1.0 per hour), "
            "1.00 GPU-hours\n") in text  # idle: nothing to add
    page = render_html(a, [], None)
    assert '<div class="label">GPU-hours</div><div class="value">2.00</div>' in page
    assert '<div class="label">slots busy</div><div class="value">75%</div>' in page
    row = re.search(r'<tr data-slot="1">(.*?)</tr>', page).group(1)
    assert "on node-b" in row and ">50%</td>" in row and "<td class=num>1.00</td>" in row and "idle" in row

    # once the last trial has ended, at 3900 s, and read long after: the run's span ends at that end
    ledger = Ledger(a.ws.ledger_path)
    ledger.update(ids["running"], status=Status.DISCARD, val_bpb=2.55, ended_at=RUN_START + 3900,
                  hardware={"device": "cuda", "gpus": [0], "slot": 0})
    ledger.close()
    data = read_ledger(a.ws.ledger_path)
    later = Analysis(a.ws, data.trials, data.meta, RUN_START + 5 * 3600)
    zero, one = later.slots
    assert later.run_span_seconds == pytest.approx(3900) and zero.state == SlotState.IDLE
    assert zero.busy_fraction == pytest.approx(1.0) and one.busy_fraction == pytest.approx(1800 / 3900)
    assert later.device_hours == pytest.approx((3900 + 2 * 1800) / 3600)


def test_a_lost_slot_is_reported_with_why_and_its_trial_is_no_crash(tmp_path, cpu_prepared):
    from autoresearch.report.data import SlotState
    from autoresearch.report.html import render_html
    from autoresearch.report.summary import markdown

    a, ids = slotted_analysis(tmp_path, cpu_prepared, lost=True)
    lost = a.slots[1]
    assert lost.state == SlotState.LOST and lost.lost_reason == "its machine (node-b) went away"
    assert lost.busy_fraction == pytest.approx(0.5)  # it was busy until its machine went away
    assert a.crashes == [] and a.counts()[Status.LOST] == 1  # lost with its machine: run again, no crash
    assert ("  - slot 1, GPUs 0, 1 (2x NVIDIA H100 80GB HBM3) on node-b: busy 50%, 1 trial(s) finished (1.0 per hour), "
            "1.00 GPU-hours; now lost: its machine (node-b) went away") in markdown(a, [])
    assert 'class=slot-lost>lost: its machine (node-b) went away</td>' in render_html(a, [], None)


def test_a_ledger_without_slots_is_one_slot_and_reads_as_before(workspace_copy):
    """A ledger from before there were slots: no meta `slots`, no slot in any row. It is one slot, slot 0,
    that ran every trial; the report says what it said then, and names no slot."""
    from autoresearch.report.data import duration, load
    from autoresearch.report.html import render_html
    from autoresearch.report.summary import markdown

    ledger = Ledger(workspace_copy / ".autoresearch" / "ledger.db")
    for t in ledger.trials():
        ledger.update(t.id, hardware={k: v for k, v in t.hardware.items() if k != "slot"})
    ledger.db.execute("DELETE FROM meta WHERE key = 'slots'")
    ledger.db.commit()
    ledger.close()
    trials, _ = ledger_trials(workspace_copy)
    a = load(workspace_copy)
    assert not a.slots_recorded and not a.slots_worth_showing
    (only,) = a.slots
    assert only.index == 0 and [t.id for t in only.trials] == [t.id for t in trials]
    assert only.busy_fraction == pytest.approx(a.compute_seconds / a.span_seconds)
    assert a.device_hours == pytest.approx(a.compute_seconds / 3600)  # CPU-hours: the trials' wall time
    text = markdown(a, [])
    assert f"{a.compute_seconds / 3600:.2f} CPU-hours (sum of trial wall times: {duration(a.compute_seconds)})" in text
    assert not re.search(r"^- slots:|slot \d", text, re.MULTILINE)
    page = render_html(a, [], None)
    assert "Slots" not in page and "slots busy" not in page


def test_a_slot_is_named_by_where_it_runs():
    """As the lab records slots (report_helpers.slot_record): a GPU of this host, GPUs of a Ray node (which
    assigns them: their numbers are not recorded, their count is in the device class), a share of a CPU."""
    from autoresearch.report.data import SlotView
    from report_helpers import H100, slot_record

    def where(**fields):
        return SlotView.recorded(slot_record(0, RUN_START, **fields), 0).where

    assert where(gpus=[3]) == f"GPU 3 ({H100})"
    assert where(gpus=None, executor="ray", node="8f14e45f", host="node-c") == f"GPU ({H100}) on node-c"
    assert where(gpus=None, device_class=f"4x {H100}", executor="ray", node="8f14e45f", host="") == \
        f"4 GPUs (4x {H100}) on node 8f14e45f"
    assert where(device="cpu", threads=1, device_class="CPU Intel Xeon (1 threads)") == "CPU, 1 thread"
    assert where(device="cpu", threads=8, executor="ray", node="8f14e45f", host="node-d") == "CPU, 8 threads on node-d"
