"""`autoresearch dashboard`: a local page that follows the run live.

End to end in headless Chromium (Debian's `chromium`, driven by Playwright; no browser download):
the page loads from 127.0.0.1 only, shows the trials of the real small workspace of
test_report.py, and follows one more real trial as it runs (its loss curve) and lands (its row).
Set AUTORESEARCH_REQUIRE_BROWSER=1 (CI does) to fail rather than skip when Chromium is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from report_helpers import ledger_trials, running_trial_with_progress, set_budget, start_trial, wait_for

CHROMIUM = os.environ.get("AUTORESEARCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


@pytest.fixture
def served(workspace_copy):
    from autoresearch.report import make_server

    server = make_server(workspace_copy, port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


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


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and shutil.which(CHROMIUM)):
        if os.environ.get("AUTORESEARCH_REQUIRE_BROWSER"):
            pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("AUTORESEARCH_REQUIRE_BROWSER"):
            raise
        pytest.skip("the playwright package is not installed (pip install playwright; no `playwright install`)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


# --- the JSON endpoints ----------------------------------------------------------------------------------
def test_the_api_serves_the_ledger(served, workspace_copy):
    trials, sigma = ledger_trials(workspace_copy)
    status, data = api(served, "/api/trials")
    assert status == 200
    assert [(t["id"], t["kind"], t["status"], t["description"]) for t in data["trials"]] == \
        [(t.id, t.kind, t.status, t.description) for t in trials]
    assert [t["val_bpb"] for t in data["trials"]] == [t.val_bpb for t in trials]
    assert data["summary"]["sigma"] == sigma and data["summary"]["best_mean"] == trials[2].val_bpb
    assert data["summary"]["counts"] == {"keep": 3, "discard": 1, "crash": 1, "running": 0}
    assert data["workspace"]["root"] == str(workspace_copy)

    status, one = api(served, "/api/trial/3")
    assert status == 200 and "+LR = 0.03" in one["diff"] and one["decision"]["action"] == "keep"
    assert "val_bpb:" in one["log_tail"]
    status, current = api(served, "/api/current")
    assert status == 200 and current["running"] is False and current["trial"]["id"] == 5
    status, _ = api(served, "/api/trial/99")
    assert status == 404


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
    page.wait_for_selector("#trials tbody tr >> nth=4")
    rows = page.locator("#trials tbody tr")
    assert rows.count() == 5
    assert [rows.nth(i).get_attribute("data-trial-id") for i in range(5)] == ["5", "4", "3", "2", "1"]
    text = page.inner_text("#trials")
    for description in ("baseline (seed 1)", "LR 0.003 -> 0.03", "DIM 32 -> 2", "divide by zero", "ZeroDivisionError"):
        assert description in text
    trials, _ = ledger_trials(workspace_copy)
    assert f"{trials[2].val_bpb:.6f}" in page.inner_text("#cards")
    assert page.locator("#progress-chart g.point").count() == 5
    assert page.locator("#progress-chart g.point.crash").count() == 1
    assert page.locator("#progress-chart .kept-label").all_text_contents() == ["LR 0.003 -> 0.03"]
    assert page.locator("#best-line").count() == 1

    # a click shows a trial's diff
    page.click('#trials tr[data-trial-id="3"]')
    page.wait_for_selector("#detail pre.diff")
    assert "+LR = 0.03" in page.inner_text("#detail pre.diff")

    # one more real trial: the page shows it running, with its loss curve, then its result
    set_budget(workspace_copy, 5.0)
    proc = start_trial(workspace_copy, "SEED = 0", "SEED = 1", "seed 0 -> 1")
    try:
        trial_id = wait_for(lambda: running_trial_with_progress(workspace_copy), what="a running trial")
        page.wait_for_selector('#current[data-running="true"]', timeout=20000)
        wait_for(lambda: loss_points(page) >= 2, timeout=20, what="the running trial's loss curve")
        assert page.inner_text("#current-title") == f"Running: trial {trial_id}"
        assert int(page.inner_text("#current-step")) > 0
        assert page.inner_text("#current-left").endswith("s")
        page.wait_for_selector(f'#trials tr[data-trial-id="{trial_id}"][data-status="running"]', timeout=20000)
        page.screenshot(path=str(tmp_path / "dashboard-running.png"), full_page=True)
    finally:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    final = ledger_trials(workspace_copy)[0][-1]
    page.wait_for_selector(f'#trials tr[data-trial-id="{trial_id}"][data-status="{final.status}"]', timeout=20000)
    page.wait_for_selector('#current[data-running="false"]', timeout=20000)
    assert page.locator("#trials tbody tr").count() == 6
    assert page.locator("#progress-chart g.point").count() == 6
    assert f"{final.val_bpb:.6f}" in page.inner_text(f'#trials tr[data-trial-id="{trial_id}"]')

    assert problems == []
    assert requests and all(url.startswith(served.url) for url in requests), requests  # nothing from the internet
    page.close()
