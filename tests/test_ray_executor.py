"""Trials on a Ray cluster: the same sandboxed trials, scheduled as Ray tasks on the cluster's nodes.

Real Ray, on 127.0.0.1 only: a cluster started inside the test process with two logical GPUs (the
scheduling of GPU slots, on a machine without a GPU), then a two-node cluster started with
`ray start` (a head, and a second node joined to it), driven by the `autoresearch` command, with
the lab killed -9 and a node killed mid-trial. The tiny trainer, under the strict rule: what is
tested is the scheduling, not the keep rule.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from autoresearch.lab.ledger import Ledger  # noqa: E402
from autoresearch.lab.loop import Lab  # noqa: E402
from autoresearch.lab.outcomes import Kind, Status  # noqa: E402
from autoresearch.lab.ray_executor import RayExecutor, manifest_digest  # noqa: E402
from autoresearch.lab.workspace import git  # noqa: E402
from autoresearch.proposers.scripted import ScriptedProposer  # noqa: E402
from lab_helpers import make_workspace, survivors, trainer_processes  # noqa: E402

# Edits of different lines, so that one still applies onto a best that holds the other.
EDITS = [{"description": "LR 0.003 -> 0.01", "replace": [["LR = 0.003", "LR = 0.01"]]},
         {"description": "DIM 32 -> 48", "replace": [["DIM = 32", "DIM = 48"]]}]
RAY = str(Path(sys.executable).parent / "ray")
# A dead node is noticed within about a second rather than the default fifteen.
# No token: a cluster on 127.0.0.1 that the test's own processes alone reach.
CLUSTER_ENV = {"RAY_health_check_period_ms": "300", "RAY_health_check_failure_threshold": "3",
               "RAY_health_check_initial_delay_ms": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def overlapping(trials) -> bool:
    spans = sorted((t.started_at, t.ended_at) for t in trials if t.ended_at)
    return any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))


def test_two_logical_gpus_run_two_trials_at_once_each_on_its_own_gpu_with_the_data_shipped(
        tmp_path, cpu_prepared, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "node-home"))  # where the node keeps the shipped data
    ws = make_workspace(tmp_path / "ws", cpu_prepared, budget=2.0, baseline_runs=2, rule="strict")
    executor = RayExecutor(Path(ws.config["data"]), address=None, init={"num_cpus": 2, "num_gpus": 2},
                           ship_data=True)
    try:
        slots = executor.slots()
        assert len(slots) == 2 and all(s.num_gpus == 1 for s in slots)  # a slot per GPU of the node
        lab = Lab(ws, log=lambda msg: None, slots=slots, executor=executor)
        lab.run(ScriptedProposer(EDITS))
        trials = lab.ledger.trials()
        assert [t.status for t in trials if t.kind == Kind.BASELINE] == [Status.KEEP, Status.KEEP]
        assert {t.description for t in trials if t.kind == Kind.CANDIDATE} == {e["description"] for e in EDITS}
        assert all(t.status in (Status.KEEP, Status.DISCARD, Status.SUPERSEDED) for t in trials)
        assert overlapping(trials), "the two slots never ran at once"
        gpus = [tuple(t.hardware["ray_gpu_ids"]) for t in trials]
        assert set(gpus) == {("0",), ("1",)}  # each trial had one GPU, and both GPUs were used
        for a in trials:  # two trials that ran at the same time had different GPUs
            for b in trials:
                if a.id < b.id and a.ended_at and b.started_at < a.ended_at and a.started_at < b.ended_at:
                    assert a.hardware["ray_gpu_ids"] != b.hardware["ray_gpu_ids"]
        shipped = tmp_path / "node-home" / ".cache" / "autoresearch" / "ray-data" / manifest_digest(Path(ws.config["data"]))
        assert (shipped / "manifest.json").read_bytes() == (Path(ws.config["data"]) / "manifest.json").read_bytes()
        assert git(ws.root, "rev-parse", "HEAD") == lab.best().commit
        slots_meta = lab.ledger.get_meta("slots")
        assert [s["executor"] for s in slots_meta] == ["ray", "ray"] and not any(s["lost"] for s in slots_meta)
        lab.close()
    finally:
        executor.close()
    assert not trainer_processes(ws)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_where_no_cluster_answers_is_refused_at_once_with_the_fix(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, baseline_runs=1)
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "autoresearch", "run", str(ws.root), "--executor", "ray",
                           "--address", address], capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 30
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"--address {address}: no Ray cluster answers there" in done.stderr and "ray start --head" in done.stderr
    assert not ws.ledger_path.exists() or not Ledger(ws.ledger_path).trials()


@pytest.fixture(scope="module")
def two_nodes():
    """A Ray head and a second node joined to it, on 127.0.0.1, one CPU each; the second node's
    `ray start --block` process, to kill it by; the environment to run the lab in."""
    port = free_port()
    env = {**os.environ, **CLUSTER_ENV}
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
                    "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    address = f"127.0.0.1:{port}"
    node = subprocess.Popen([RAY, "start", "--block", f"--address={address}", "--node-ip-address=127.0.0.1",
                             "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True, text=True)
            if status.stdout.count("node_") >= 2:
                break
            time.sleep(1)
        else:
            pytest.fail(f"the second node never joined: {status.stdout}{status.stderr}")
        yield address, node, env
    finally:
        node.kill()
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, by their parent links in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_command(ws, address: str, script: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "autoresearch", "run", str(ws.root), "--executor", "ray", "--address", address,
            "--parallel", "2", "--script", str(script), *more]


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(what)


def test_kill_9_of_the_lab_leaves_no_ray_task_or_process_and_run_resumes(tmp_path, cpu_prepared, two_nodes):
    address, _, env = two_nodes
    ws = make_workspace(tmp_path / "ws", cpu_prepared, budget=4.0, baseline_runs=2, rule="strict")
    script = tmp_path / "edits.json"
    script.write_text(json.dumps(EDITS))
    lab = subprocess.Popen(run_command(ws, address, script), env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    wait_for(lambda: len(trainer_processes(ws)) >= 2, 180, "two trials never ran at once on the two nodes")
    lab.send_signal(signal.SIGKILL)
    lab.wait()
    assert not survivors(ws, within=30), "a trial outlived the lab"
    done = subprocess.run(run_command(ws, address, script, "--max-trials", "2", "--confirm-runs", "0"), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "was in flight when the lab stopped" in done.stdout
    trials = Ledger(ws.ledger_path).trials()
    assert Status.RUNNING not in {t.status for t in trials}
    assert len([t for t in trials if t.kind == Kind.BASELINE and t.status == Status.KEEP]) == 2
    assert len({t.hardware.get("node") for t in trials if t.hardware.get("node")}) == 2  # both nodes ran trials
    assert not trainer_processes(ws)


def test_a_node_killed_mid_trial_gives_a_lost_trial_run_again_on_the_other_node(tmp_path, cpu_prepared, two_nodes):
    address, node, env = two_nodes
    ws = make_workspace(tmp_path / "ws", cpu_prepared, budget=6.0, baseline_runs=1, rule="strict")
    script = tmp_path / "edits.json"
    script.write_text(json.dumps(EDITS))
    lab = subprocess.Popen(run_command(ws, address, script, "--max-trials", "2", "--confirm-runs", "0"), env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # A trial running on the second node: its supervisor is a descendant of that node's `ray start`.
    wait_for(lambda: any(b"autoresearch.lab.supervisor" in Path(f"/proc/{p}/cmdline").read_bytes()
                         for p in descendants(node.pid) if Path(f"/proc/{p}").exists()),
             180, "no trial ever ran on the second node")
    raylets = [p for p in descendants(node.pid) if b"raylet" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert raylets
    for pid in raylets:  # the node dies: its raylet, and the `ray start` that watched it
        os.kill(pid, signal.SIGKILL)
    node.kill()
    out, err = lab.communicate(timeout=600)
    assert lab.returncode == 0, err
    trials = Ledger(ws.ledger_path).trials()
    lost = [t for t in trials if t.status == Status.LOST]
    assert lost and all(t.reason.startswith("lost: ") for t in lost)
    for t in lost:  # each lost trial was run again elsewhere: as it was, or onto a best that moved meanwhile
        again = [u for u in trials if u.id > t.id and u.status != Status.LOST and (
                 u.commit_sha == t.commit_sha or u.decision.get("reapplied_from") == t.id)]
        assert again, f"trial {t.id} was lost and never run again: {[(u.id, u.kind, u.status) for u in trials]}"
    assert Status.RUNNING not in {t.status for t in trials}
    slots = Ledger(ws.ledger_path).get_meta("slots")
    assert [s["lost"] for s in slots].count(True) == 1
    assert "slot" in out and "is lost" in out
    assert not survivors(ws, within=30), "a trial of the dead node outlived it"
