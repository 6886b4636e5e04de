"""`autoresearch dashboard`: a local page that follows the run live.

End to end in headless Chromium (Debian's `chromium`, driven by Playwright; no browser download):
the page loads from 127.0.0.1 only, shows the trials of the real small workspace of
test_report.py, and follows one more real trial as it runs (its loss curve) and lands (its row).
Expectations come from the ledger and the lab's own functions (report_helpers.ledger_trials).
Set AUTORESEARCH_REQUIRE_BROWSER=1 (CI does) to fail rather than skip when Chromium is missing.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

from autoresearch.lab.outcomes import Kind, Status
from lab_helpers import make_workspace
from report_helpers import (  # noqa: F401 (browser: a fixture)
    NODE_B, add_trial, browser, ledger_trials, running_trial_with_progress, scripted, set_budget, start_trial,
    two_slot_run, wait_for)


def serving(root):
    """The dashboard of `root` on a free port, serving in a thread until the generator is closed."""
    from autoresearch.report import make_server

    server = make_server(root, port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def served(workspace_copy):
    yield from serving(workspace_copy)


@pytest.fixture
def slotted(tmp_path, cpu_prepared):
    """(a fresh workspace holding report_helpers.two_slot_run, begun an hour ago; the ids of its trials)."""
    ws = make_workspace(tmp_path / "slotted", cpu_prepared)
    return ws.root, two_slot_run(ws.root, time.time() - 3600)


@pytest.fixture
def served_slots(slotted):
    yield from serving(slotted[0])


def get(url: str, host: str | None = None):
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def api(server, path: str):
    status, _, body = get(server.url.rstrip("/") + path)
    return status, json.loads(body)


def last_result(trials):
    """The last trial with a val_bpb the lab decided on: the one an idle page shows."""
    return [t for t in trials if t.status in (Status.KEEP, Status.DISCARD) and t.val_bpb is not None][-1]


def points_on_the_plot(trials) -> int:
    """A point per measured trial, and one per crash on the crash row."""
    return sum(t.val_bpb is not None or t.status == Status.CRASH for t in trials)


# --- the JSON endpoints ----------------------------------------------------------------------------------
def test_the_api_serves_the_ledger_and_the_labs_numbers(served, workspace_copy):
    trials, lab = ledger_trials(workspace_copy)
    status, data = api(served, "/api/trials")
    assert status == 200
    assert [(t["id"], t["kind"], t["status"], t["description"]) for t in data["trials"]] == \
        [(t.id, t.kind, t.status, t.description) for t in trials]
    assert [t["val_bpb"] for t in data["trials"]] == [t.val_bpb for t in trials]
    summary = data["summary"]
    assert (summary["sigma"], summary["sigma_df"]) == (lab.noise.sigma, lab.noise.df)
    assert summary["detectable_gain"] == pytest.approx(lab.detectable_gain)
    assert summary["best_mean"] == pytest.approx(lab.best.mean) and summary["best_n"] == len(lab.best.values)
    assert summary["best_commit"] == lab.best.commit
    assert summary["best_is_baseline"] is (lab.best.commit == lab.base_commit)
    if not summary["best_is_baseline"]:
        assert summary["improvement_low"] < summary["improvement"] < summary["improvement_high"]
    count = Counter(t.status for t in trials)
    assert summary["counts"] == {str(s): count[s] for s in Status}
    assert summary["tally"] == [[str(s), count[s]] for s in (Status.KEEP, Status.DISCARD, Status.CRASH)]
    assert data["workspace"]["root"] == str(workspace_copy)

    gain = scripted(trials, 0)
    status, one = api(served, f"/api/trial/{gain.id}")
    assert status == 200 and "+LR = 0.03" in one["diff"] and one["decision"] == gain.decision
    assert "val_bpb:" in one["log_tail"]
    status, current = api(served, "/api/current")  # idle: the last result, and the crash after it
    shown, (crashed,) = last_result(trials), [t for t in trials if t.status == Status.CRASH]
    assert status == 200 and current["running"] is False and current["trial"]["id"] == shown.id
    assert crashed.id == trials[-1].id  # the ledger ends with the crash
    assert current["latest"]["id"] == crashed.id and current["latest"]["status"] == "crash"
    assert current["latest"]["failure"] == "exit"
    status, _ = api(served, f"/api/trial/{trials[-1].id + 1}")
    assert status == 404


def test_when_idle_the_current_trial_is_the_last_with_a_result_not_a_dead_one(served, workspace_copy):
    shown = last_result(ledger_trials(workspace_copy)[0])
    steps_shown = len(api(served, "/api/current")[1]["points"])
    stopped = add_trial(workspace_copy, Status.STOPPED, description="stopped half-way",
                        reason="stopped: the lab was told to stop during this trial",
                        progress=[f"train step={n} loss={9 - n}.0" for n in range(1, 6)])
    _, current = api(served, "/api/current")
    assert current["running"] is False and current["trial"]["id"] == shown.id
    assert len(current["points"]) == steps_shown > 0  # the last result's curve, not the stopped trial's
    assert (current["latest"]["id"], current["latest"]["status"]) == (stopped, "stopped")
    assert "told to stop" in current["latest"]["reason"]

    # a row a dead lab left running is no running trial either
    stale = add_trial(workspace_copy, Status.RUNNING, description="killed with the lab", started_at=time.time() - 6 * 3600,
                      progress=["train step=1 loss=9.0"])
    _, current = api(served, "/api/current")
    assert current["running"] is False and current["trial"]["id"] == shown.id
    assert current["latest"]["id"] == stale and current["stale"] == [stale]
    _, data = api(served, "/api/trials")
    assert [t["stale"] for t in data["trials"]][-2:] == [False, True]


def test_the_api_lists_every_slot_with_what_it_runs_and_its_share_of_the_run(served_slots, slotted):
    """Two GPU slots, an hour into the run: slot 0 runs a trial (its latest progress point from its train.log),
    slot 1 (a Ray node's two GPUs) is idle; each with the share of the run it was busy."""
    _, ids = slotted
    status, data = api(served_slots, "/api/slots")
    assert status == 200 and data["shown"] is True and data["recorded"] is True
    assert data["accelerator"] == "GPU" and data["device_hours"] == pytest.approx(2.0, abs=0.01)
    assert data["busy_fraction"] == pytest.approx(0.75, abs=0.01) and data["span_seconds"] == pytest.approx(3600, abs=30)
    zero, one = data["slots"]
    assert {k: zero[k] for k in ("slot", "where", "device", "gpus", "executor", "node", "state", "finished")} == {
        "slot": 0, "where": "GPU 0 (NVIDIA H100 80GB HBM3)", "device": "cuda", "gpus": [0], "executor": "local",
        "node": None, "state": "running", "finished": 2}
    assert (zero["trial"]["id"], zero["trial"]["description"], zero["trial"]["slot"]) == \
        (ids["running"], "deeper model", 0)
    assert zero["progress"] == {"step": 340, "progress_pct": 45.0, "loss": 3.0, "lrm": 1.0, "dt_ms": 12,
                                "tok_per_s": 150000, "mfu_pct": 38.5, "epoch": 0, "remaining_s": 165}
    assert zero["busy_fraction"] == pytest.approx(1.0) and zero["device_hours"] == pytest.approx(1.0, abs=0.01)
    assert {k: one[k] for k in ("slot", "where", "gpus", "executor", "node", "host", "state", "trial", "progress")} == {
        "slot": 1, "where": "GPUs 0, 1 (2x NVIDIA H100 80GB HBM3) on node-b", "gpus": [0, 1], "executor": "ray",
        "node": NODE_B, "host": "node-b", "state": "idle", "trial": None, "progress": None}
    assert one["busy_fraction"] == pytest.approx(0.5, abs=0.01) and one["trials_per_hour"] == pytest.approx(1.0, abs=0.01)
    _, current = api(served_slots, "/api/current")
    assert current["running"] is True and current["trial"]["id"] == ids["running"] and current["trial"]["slot"] == 0


def test_a_ledger_of_one_slot_lists_it_without_showing_it(served):
    _, data = api(served, "/api/slots")
    assert data["shown"] is False and [s["slot"] for s in data["slots"]] == [0]
    assert data["slots"][0]["state"] == "idle" and data["slots"][0]["device"] == "cpu"


def test_the_server_answers_only_to_this_machine_and_serves_only_its_files(served):
    status, headers, _ = get(served.url)
    assert status == 200 and "default-src 'self'" in headers["Content-Security-Policy"]
    assert get(served.url, host="attacker.example")[0] == 403  # DNS rebinding
    assert get(served.url + "static/../data.py")[0] == 404
    assert get(served.url + "static/nothing.js")[0] == 404


def test_a_port_in_use_gets_a_clear_message(workspace_copy):
    from autoresearch.report import PortInUse, ReportError, make_server

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(PortInUse, match=rf"Port {port} on 127.0.0.1 is in use.*--port {port + 1}") as caught:
            make_server(workspace_copy, port=port)
        assert isinstance(caught.value, ReportError)
    finally:
        taken.close()


def loss_points(page) -> int:
    """Points on the page's loss curve (polled from Python: the page's CSP forbids eval)."""
    line = page.query_selector("#loss-line")
    return int(line.get_attribute("data-points") or 0) if line else 0


# --- in the browser -----------------------------------------------------------------------------------------
def test_the_page_shows_the_run_and_follows_a_new_trial_live(browser, served, workspace_copy, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems, requests = [], []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(served.url)

    # the run as it is: every trial in the table and on the plot
    trials, lab = ledger_trials(workspace_copy)
    page.wait_for_selector(f"#trials tbody tr >> nth={len(trials) - 1}")
    page.wait_for_selector('#live[data-state="idle"]')  # nothing runs: no green light
    assert "no trial running" in page.inner_text("#live")
    rows = page.locator("#trials tbody tr")
    assert rows.count() == len(trials)
    assert [rows.nth(i).get_attribute("data-trial-id") for i in range(len(trials))] == \
        [str(t.id) for t in reversed(trials)]
    text = page.inner_text("#trials")
    for description in ("baseline (seed 1)", "LR 0.003 -> 0.03", "DIM 32 -> 2", "divide by zero", "ZeroDivisionError"):
        assert description in text
    cards = page.inner_text("#cards")
    assert f"{lab.best.mean:.6f}" in cards
    assert f"{lab.noise.sigma:.6f}" in cards and f"{lab.noise.df} df" in cards
    assert f"gains under {lab.detectable_gain:.4g} are invisible here" in cards
    kept = [t for t in trials if t.kind == Kind.CANDIDATE and t.status == Status.KEEP]
    crashes = [t for t in trials if t.status == Status.CRASH]
    assert page.locator("#progress-chart g.point").count() == points_on_the_plot(trials)
    assert page.locator("#progress-chart g.point.crash").count() == len(crashes)
    assert page.locator("#progress-chart .kept-label").all_text_contents() == [t.description for t in kept]
    assert page.locator("#best-line").count() == 1
    # idle: the last trial with a result and its curve, and the crash after it said plainly
    assert page.inner_text("#current-title") == f"Last result: trial {last_result(trials).id}"
    assert loss_points(page) > 0
    note = page.inner_text("#current-note")
    assert f"The latest trial, {crashes[-1].id} (divide by zero), crashed (exit)" in note and "ZeroDivisionError" in note
    assert page.inner_text("#current-mfu") == "n/a"  # a CPU has no MFU
    assert page.locator("#slots").is_hidden()  # one slot: the current trial says it all

    # a click shows a trial's diff
    gain = scripted(trials, 0)
    page.click(f'#trials tr[data-trial-id="{gain.id}"]')
    page.wait_for_selector("#detail pre.diff")
    assert page.inner_text("#detail pre.diff") == gain.diff.rstrip("\n")  # line for line, no blank lines
    assert "MFU n/a" in page.inner_text("#detail")

    # one more real trial: the page shows it running, with its loss curve, then its result
    set_budget(workspace_copy, 5.0)
    proc = start_trial(workspace_copy, "SEED = 0", "SEED = 1", "seed 0 -> 1")
    try:
        trial_id = wait_for(lambda: running_trial_with_progress(workspace_copy), what="a running trial")
        page.wait_for_selector('#current[data-running="true"]', timeout=20000)
        page.wait_for_selector('#live[data-state="running"]')
        assert f"trial {trial_id} running" in page.inner_text("#live")
        wait_for(lambda: loss_points(page) >= 2, timeout=20, what="the running trial's loss curve")
        assert page.inner_text("#current-title") == f"Running: trial {trial_id}"
        assert page.locator("#current-note").is_hidden()
        assert int(page.inner_text("#current-step")) > 0
        assert page.inner_text("#current-mfu") == "n/a"  # the trainer prints mfu_pct=0.0 on a CPU
        assert page.inner_text("#current-left").endswith("s")
        page.wait_for_selector(f'#trials tr[data-trial-id="{trial_id}"][data-status="running"]', timeout=20000)
        page.screenshot(path=str(tmp_path / "dashboard-running.png"), full_page=True)
    finally:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    trials = ledger_trials(workspace_copy)[0]  # a borderline result is re-run under another seed: rows after it
    final, last = next(t for t in trials if t.id == trial_id), trials[-1]
    page.wait_for_selector(f'#trials tr[data-trial-id="{last.id}"][data-status="{last.status}"]', timeout=20000)
    page.wait_for_selector(f'#trials tr[data-trial-id="{trial_id}"][data-status="{final.status}"]', timeout=20000)
    page.wait_for_selector('#current[data-running="false"]', timeout=20000)
    page.wait_for_selector('#live[data-state="idle"]')
    assert page.inner_text("#current-title") == f"Last result: trial {last_result(trials).id}"
    assert page.locator("#current-note").is_hidden()
    assert page.locator("#trials tbody tr").count() == len(trials)
    assert page.locator("#progress-chart g.point").count() == points_on_the_plot(trials)
    assert f"{final.val_bpb:.6f}" in page.inner_text(f'#trials tr[data-trial-id="{trial_id}"]')

    assert problems == []
    assert requests and all(url.startswith(served.url) for url in requests), requests  # nothing from the internet
    page.close()


def axis_labels(page, chart: str) -> list[str]:
    """The labels along a chart's horizontal axis (centred text, the axes' titles left out)."""
    return [t for t in page.locator(f'{chart} text[text-anchor="middle"]').all_text_contents()
            if t not in ("step", "trial", "val_bpb")]


def test_the_step_axis_names_each_step_once(browser, served, workspace_copy):
    """A curve of a few steps: whole steps, none twice (not 1 1 2 2 3)."""
    trial_id = add_trial(workspace_copy, Status.DISCARD, description="three steps", val_bpb=2.9,
                         progress=[f"train step={n} progress_pct={33.3 * n:.1f} loss={8 - n}.0 mfu_pct=0.0"
                                   for n in (1, 2, 3)])
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(served.url)
    page.wait_for_selector('#loss-line[data-points="3"]')
    assert axis_labels(page, "#loss-chart") == ["1", "2", "3"]
    assert axis_labels(page, "#progress-chart") == [str(n) for n in range(1, trial_id + 1)]
    assert page.inner_text("#current-title") == f"Last result: trial {trial_id}"
    page.close()


def test_a_row_a_dead_lab_left_running_shows_no_live_trial(browser, served, workspace_copy):
    stale = add_trial(workspace_copy, Status.RUNNING, description="killed with the lab", started_at=time.time() - 6 * 3600)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(served.url)
    page.wait_for_selector('#live[data-state="stopped"]')
    assert f"the lab stopped during trial {stale}" in page.inner_text("#live")
    assert page.get_attribute("#current", "data-running") == "false"
    assert page.inner_text("#current-title") == f"Last result: trial {last_result(ledger_trials(workspace_copy)[0]).id}"
    assert f"The latest trial, {stale} (killed with the lab), is recorded as running" in page.inner_text("#current-note")
    row = page.inner_text(f'#trials tr[data-trial-id="{stale}"]')
    assert "left running by a lab that stopped" in row and row.split("\t")[6] == "-"  # no clock running on
    assert page.locator('#progress-chart line[stroke="#ff9800"]').count() == 0  # no trial in flight
    page.close()


def test_an_unsandboxed_trial_is_marked_in_the_api(served, workspace_copy):
    trial_id = add_trial(workspace_copy, Status.DISCARD, description="run by hand", val_bpb=2.5, sandboxed=False)
    _, data = api(served, "/api/trials")
    row = next(t for t in data["trials"] if t["id"] == trial_id)
    assert row["sandboxed"] is False and all(t["sandboxed"] for t in data["trials"] if t["id"] != trial_id)
    assert "1 of" in data["summary"]["unsandboxed"] and "unsandboxed" in data["summary"]["unsandboxed"]


def test_the_page_shows_every_slot_when_there_are_several(browser, served_slots, slotted):
    root, ids = slotted
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(served_slots.url)
    page.wait_for_selector('#slots .slot[data-slot="1"]')
    assert page.locator("#slots").is_visible()
    assert [page.locator("#slots .slot").nth(i).get_attribute("data-state") for i in range(2)] == ["running", "idle"]
    running = page.inner_text('#slots .slot[data-slot="0"]')
    assert "GPU 0 (NVIDIA H100 80GB HBM3)" in running and "busy 100%" in running
    assert f"running trial {ids['running']}: deeper model, 10m0" in running and "step 340 (45%)" in running
    assert page.get_attribute('#slots .slot[data-slot="0"] progress', "value") == "45"
    idle = page.inner_text('#slots .slot[data-slot="1"]')
    assert "on node-b" in idle and "idle" in idle and "busy 50%" in idle
    assert "2 slots · busy 75% of the run's 1h00m · 2.00 GPU-hours" in page.inner_text("#slots-meta")
    assert f"trial {ids['running']} running" in page.inner_text("#live")

    # its machine gone, the slot says so
    from report_helpers import record_slots, slot_record

    start = time.time() - 3600
    record_slots(root, [slot_record(0, start, gpus=[0]),
                        slot_record(1, start, gpus=[0, 1], executor="ray", node=NODE_B, host="node-b",
                                    lost=True, lost_reason="its machine (node-b) went away")])
    page.wait_for_selector('#slots .slot[data-slot="1"][data-state="lost"]', timeout=20000)
    assert "lost: its machine (node-b) went away" in page.inner_text('#slots .slot[data-slot="1"]')
    assert problems == []
    page.close()
