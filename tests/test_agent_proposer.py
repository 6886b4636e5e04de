"""The agent proposer and the prompt it shares with the LLM proposer.

Coding agents are played by small executables in tests/agents/ that parse their command lines like
the real tools (`claude`, `codex`, `aider`, and a custom one) and edit train.py the way an agent
would; they are put first on PATH, so the presets' real command lines run. The loop itself runs
end to end on the tiny trainer.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoresearch.lab.ledger import Ledger, Trial
from autoresearch.lab.loop import Lab
from autoresearch.lab.outcomes import Failure, Kind, Status
from autoresearch.lab.proposer import ProposalContext
from autoresearch.lab.workspace import GITIGNORE, git
from autoresearch.proposers.agent import PRESETS, AgentError, AgentProposer
from autoresearch.proposers.prompt import agent_prompt, history_section, llm_prompt
from lab_helpers import TINY_TRAINER, alive, ledger_row, make_workspace

AGENTS = Path(__file__).parent / "agents"
PROGRAM = (Path(__file__).parents[1] / "src" / "autoresearch" / "templates" / "program.md").read_text()
CUSTOM = "custom-agent --prompt-file {prompt_file} --workdir {workspace}"


# --- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def agents(tmp_path, monkeypatch):
    """The fake agents first on PATH; returns a reader of what they logged."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("claude", "codex", "aider", "custom-agent"):
        source = AGENTS / name
        if not os.access(source, os.X_OK):  # a checkout that lost the executable bit
            source.chmod(source.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        (bin_dir / name).symlink_to(source)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_AGENT_LOG", str(tmp_path / "agent.log"))
    monkeypatch.setenv("FAKE_AGENT_STATE", str(tmp_path / "agent.state"))
    monkeypatch.setenv("FAKE_AGENT_PIDS", str(tmp_path / "agent.pids"))
    monkeypatch.setenv("FAKE_SECRET_API_KEY", "sk-secret")
    monkeypatch.delenv("FAKE_AGENT_PLAN", raising=False)

    def calls() -> list[dict]:
        log = tmp_path / "agent.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return calls


@pytest.fixture
def repo(tmp_path) -> Path:
    """A workspace's files without the lab: git, train.py, program.md, the lab's .gitignore."""
    root = tmp_path / "ws"
    root.mkdir()
    git(root, "init", "-q", "-b", "autoresearch/test")
    git(root, "config", "user.name", "t")
    git(root, "config", "user.email", "t@localhost")
    (root / "train.py").write_text(TINY_TRAINER)
    (root / "program.md").write_text(PROGRAM)
    (root / ".gitignore").write_text(GITIGNORE)
    git(root, "add", ".")
    git(root, "commit", "-qm", "baseline")
    return root


def make_trial(id: int, status: str = "discard", description: str = "an idea", *, kind: str = "candidate",
               val_bpb: float | None = 1.0, decision: dict | None = None, reason: str = "", proposer: str = "agent",
               usage: dict | None = None, log_tail: str = "") -> Trial:
    return ledger_row(id, kind=kind, commit_sha=f"{id:07d}abc", proposer=proposer, description=description,
                      status=status, reason=reason, decision=decision or {}, val_bpb=val_bpb,
                      trainer_summary={"log_tail": log_tail} if log_tail else {}, proposer_usage=usage or {})


def context(root: Path, history: list[Trial] | None = None) -> ProposalContext:
    return ProposalContext(root, ["train.py"], "cpu", 2.0, git(root, "rev-parse", "HEAD"), 1.0, 0.01, history or [])


def status(root: Path) -> list[str]:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root, capture_output=True,
                          text=True, check=True).stdout.splitlines()


def pids_alive(path: Path) -> list[int]:
    return [pid for pid in map(int, path.read_text().split()) if alive(pid)] if path.exists() else []


# --- the prompt ---------------------------------------------------------------------------------
def history() -> list[Trial]:
    keep = {"action": "keep", "delta": 0.05, "threshold": 0.02, "why": "gain", "values": [0.95]}
    worse = {"action": "discard", "delta": -0.3, "threshold": 0.02, "why": "worse", "values": [1.25]}
    return [
        make_trial(1, "keep", "baseline", kind="baseline", val_bpb=1.0, proposer="baseline"),
        make_trial(2, "keep", "baseline (seed 1)", kind="baseline", val_bpb=1.01, proposer="baseline"),
        make_trial(3, "keep", "LR 0.003 -> 0.03", val_bpb=0.95, decision=keep),
        make_trial(4, "discard", "DIM 32 -> 2", val_bpb=1.25, decision=worse),
        make_trial(5, "crash", "divide by zero", val_bpb=None, decision={"why": "exit"},
                   reason="exit: train.py exited with code 1: ZeroDivisionError: division by zero",
                   log_tail="Traceback (most recent call last):\n  File \"train.py\", line 40\nZeroDivisionError: division by zero"),
        make_trial(6, "discard", "nothing", val_bpb=None, reason="no change: the proposal edited nothing"),
    ]


def test_the_prompt_holds_the_protocol_the_history_and_the_task(repo):
    ctx = ProposalContext(repo, ["train.py"], "cpu", 2.0, "0000003abc", 0.95, 0.007, history())
    prompt = agent_prompt(ctx, ".autoresearch/agent/00007/description.txt")
    assert prompt == agent_prompt(ctx, ".autoresearch/agent/00007/description.txt")  # deterministic
    assert "# Research protocol" in prompt and "Only `train.py`" in prompt  # program.md itself
    assert "Best so far: commit 0000003, val_bpb 0.950000" in prompt
    assert "measured 1.005000 over 2 run(s)" in prompt and "+0.055000 in total" in prompt
    assert "sigma = 0.007000" in prompt
    assert "4 (1 kept, 2 discarded, 1 crashed)" in prompt
    assert "| 3 | keep | 0.950000 | +0.050000 | LR 0.003 -> 0.03 | needed a gain over 0.020000 |" in prompt
    assert "| 4 | discard | 1.250000 | -0.300000 | DIM 32 -> 2 |" in prompt
    assert "| 6 | discard |    -     |    -     | nothing | no change: the proposal edited nothing |" in prompt
    assert "- #5 divide by zero: exit: train.py exited with code 1: ZeroDivisionError" in prompt
    assert "ZeroDivisionError: division by zero\n```" in prompt  # the latest crash's log tail
    assert "do NOT run `autoresearch trial`" in prompt
    assert "`.autoresearch/agent/00007/description.txt`" in prompt
    assert "def build_model" not in prompt  # an agent reads train.py itself
    assert "```python\n" + TINY_TRAINER.rstrip("\n") + "\n```" in llm_prompt(ctx)  # an LLM is shown it


def test_the_history_keeps_the_last_n_in_full_and_the_rest_in_brief(repo):
    trials = history()[:2] + [make_trial(i, "discard", f"idea {i}", decision={"delta": -0.01, "threshold": 0.02})
                              for i in range(3, 33)]
    text = history_section(context(repo, trials), recent=20)
    assert "Last 20 experiments" in text
    assert "| 13 | discard |" in text and "| 12 | discard |" not in text
    assert "- #12 discard (gain -0.010000): idea 12" in text and "- #3 discard" in text
    assert text.index("- #12") < text.index("- #3")  # most recent first
    first = history_section(context(repo, history()[:2]))
    assert "No experiments yet" in first


# --- presets and the custom command -------------------------------------------------------------
def test_a_custom_agent_edits_train_py_and_writes_its_description(repo, agents):
    proposer = AgentProposer.from_settings(repo, {"command": CUSTOM, "timeout": 30})
    ctx = context(repo, [make_trial(1, "keep", "baseline", kind="baseline", proposer="baseline")])
    assert proposer.propose(ctx) == "raise LR from 0.003 to 0.03"
    assert "LR = 0.03  # Adam" in (repo / "train.py").read_text()
    assert status(repo) == [" M train.py"]  # its files in .autoresearch/ are not edits
    folder = repo / ".autoresearch" / "agent" / "00002"
    assert (folder / "prompt.md").read_text().startswith("# The research protocol")
    assert proposer.last_usage["description_from"] == "file" and proposer.last_usage["exit_code"] == 0
    assert 0 < proposer.last_usage["seconds"] < 30
    (call,) = agents()
    assert call["argv"] == ["--prompt-file", str(folder / "prompt.md"), "--workdir", str(repo)]
    assert call["cwd"] == str(repo)
    assert call["secret"] == "sk-secret"  # the environment is passed through
    assert call["agent_env"] == str(repo.resolve())  # the token that finds the agent's processes again


def test_the_claude_preset_runs_headless_as_root_and_reports_its_cost(repo, agents, monkeypatch):
    monkeypatch.setenv("FAKE_AGENT_PLAN", "stdout")
    proposer = AgentProposer.from_settings(repo, {"preset": "claude", "model": "claude-sonnet-4-5"})
    assert proposer.propose(context(repo)) == "raise LR from 0.003 to 0.03"
    (call,) = agents()
    argv = call["argv"]
    assert argv[0] == "-p" and argv[1] == (repo / ".autoresearch/agent/00001/prompt.md").read_text()
    assert "--dangerously-skip-permissions" not in argv  # it refuses to run as root
    assert argv[argv.index("--permission-mode") + 1] == "acceptEdits"
    assert argv[argv.index("--model") + 1] == "claude-sonnet-4-5"
    usage = proposer.last_usage
    assert usage["cost_usd"] == 0.0123 and usage["input_tokens"] == 1200 and usage["description_from"] == "message"
    assert status(repo) == [" M train.py"]


def test_the_codex_preset_edits_in_its_sandbox_and_leaves_its_last_message(repo, agents, monkeypatch):
    monkeypatch.setenv("FAKE_AGENT_PLAN", "stdout")
    proposer = AgentProposer.from_settings(repo, {"preset": "codex", "model": "o3", "args": ["--full-auto"]})
    assert proposer.propose(context(repo)) == "raise LR from 0.003 to 0.03"
    argv = agents()[0]["argv"]
    assert argv[:1] == ["exec"] and argv[argv.index("--sandbox") + 1] == "workspace-write"
    assert argv[argv.index("--cd") + 1] == str(repo) and 'approval_policy="never"' in argv
    assert argv[-4:-1] == ["--model", "o3", "--full-auto"]
    assert argv[-1].startswith("# The research protocol")  # the prompt comes last
    assert (repo / ".autoresearch/agent/00001/last_message.txt").read_text().startswith("I changed train.py")
    assert status(repo) == [" M train.py"]


def test_the_aider_preset_leaves_no_commit_and_no_files_of_its_own(repo, agents, monkeypatch):
    monkeypatch.setenv("FAKE_AGENT_PLAN", "stdout")
    head = git(repo, "rev-parse", "HEAD")
    proposer = AgentProposer.from_settings(repo, {"preset": "aider", "model": "sonnet"})
    assert proposer.propose(context(repo)) == "raise LR from 0.003 to 0.03"
    assert proposer.last_usage["description_from"] == "stdout"
    assert git(repo, "rev-parse", "HEAD") == head
    assert status(repo) == [" M train.py"]  # no .gitignore edit, no history or cache files in the repo
    assert (repo / ".autoresearch/agent/00001/aider.chat.history.md").exists()
    assert agents()[0]["argv"][-3:] == ["train.py", "--model", "sonnet"]


def test_without_a_description_one_is_derived_from_the_change(repo, agents, monkeypatch):
    monkeypatch.setenv("FAKE_AGENT_PLAN", "silent")
    proposer = AgentProposer.from_settings(repo, {"command": CUSTOM})
    assert proposer.propose(context(repo)) == "LR 0.003 -> 0.03"
    assert proposer.last_usage["description_from"] == "diff"


def test_an_agent_that_commits_has_its_commit_undone_for_the_lab_to_audit(repo, agents, monkeypatch):
    monkeypatch.setenv("FAKE_AGENT_PLAN", "commit")
    head = git(repo, "rev-parse", "HEAD")
    proposer = AgentProposer.from_settings(repo, {"command": CUSTOM})
    assert proposer.propose(context(repo)) == "raise LR from 0.003 to 0.03"
    assert git(repo, "rev-parse", "HEAD") == head
    assert "LR = 0.03" in git(repo, "diff", "HEAD") and proposer.last_usage["agent_committed"] is True


# --- misbehaving agents -------------------------------------------------------------------------
def test_an_agent_that_exits_non_zero_raises_with_its_output(repo, agents, monkeypatch):
    monkeypatch.setenv("FAKE_AGENT_PLAN", "fail")
    proposer = AgentProposer.from_settings(repo, {"preset": "claude"})
    with pytest.raises(AgentError, match=r"exited with code 1.*the API rejected the key"):
        proposer.propose(context(repo))
    assert proposer.last_usage["exit_code"] == 1


def test_an_agent_past_its_time_limit_is_killed_with_its_children(repo, agents, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_AGENT_PLAN", "hang")
    proposer = AgentProposer.from_settings(repo, {"preset": "codex", "timeout": 3})
    started = time.monotonic()
    with pytest.raises(AgentError, match=r"ran past its time limit of 3 s.*thinking.*codex\] working"):
        proposer.propose(context(repo))
    assert time.monotonic() - started < 10
    assert len((tmp_path / "agent.pids").read_text().split()) == 2
    assert pids_alive(tmp_path / "agent.pids") == []
    assert proposer.last_usage["timed_out"] is True


@pytest.mark.parametrize("behaviour", ["straggler", "escaper"])
def test_what_an_agent_leaves_running_is_killed_even_outside_its_process_group(repo, agents, monkeypatch, tmp_path,
                                                                             behaviour):
    monkeypatch.setenv("FAKE_AGENT_PLAN", behaviour)
    proposer = AgentProposer.from_settings(repo, {"command": CUSTOM})
    assert proposer.propose(context(repo)) == "raise LR from 0.003 to 0.03"
    assert len((tmp_path / "agent.pids").read_text().split()) == 1
    assert pids_alive(tmp_path / "agent.pids") == []


def test_an_agent_left_running_by_a_lab_that_died_is_killed_before_the_next_one_starts(repo, agents, monkeypatch):
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True,
                              env={**os.environ, "AUTORESEARCH_AGENT": str(repo.resolve())})
    monkeypatch.setenv("FAKE_AGENT_WATCH", str(orphan.pid))
    try:
        proposer = AgentProposer.from_settings(repo, {"command": CUSTOM})
        assert proposer.propose(context(repo)) == "raise LR from 0.003 to 0.03"
        (call,) = agents()
        assert call["watched_alive"] is False  # gone before the new agent ran, not merely after it
        assert orphan.wait(timeout=5) == -signal.SIGKILL
    finally:
        orphan.kill()


def test_an_agent_that_edits_nothing_is_left_to_the_lab(repo, agents, monkeypatch):
    monkeypatch.setenv("FAKE_AGENT_PLAN", "nothing")
    proposer = AgentProposer.from_settings(repo, {"command": CUSTOM})
    assert proposer.propose(context(repo)) == "no change"
    assert status(repo) == []


def test_settings_are_checked_when_the_proposer_is_made(repo, agents, monkeypatch):
    with pytest.raises(ValueError, match="preset"):
        AgentProposer.from_settings(repo, {})
    with pytest.raises(ValueError, match="unknown"):
        AgentProposer.from_settings(repo, {"preset": "cursor"})
    with pytest.raises(ValueError, match="placeholder"):
        AgentProposer.from_settings(repo, {"command": "custom-agent --in {promptfile}"})
    with pytest.raises(ValueError, match="unknown key"):
        AgentProposer.from_settings(repo, {"preset": "claude", "timeout_s": 5})
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ValueError, match="'claude' is not installed"):
        AgentProposer.from_settings(repo, {"preset": "claude"})
    assert set(PRESETS) == {"claude", "codex", "aider"}


# --- the loop, end to end -----------------------------------------------------------------------
def test_the_loop_goes_on_past_agents_that_fail_edit_nothing_or_break_the_rules(tmp_path, cpu_prepared, agents,
                                                                                 monkeypatch):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, baseline_runs=1, rule="strict")
    monkeypatch.setenv("FAKE_AGENT_PLAN", "fail,nothing,forbidden,good")
    proposer = AgentProposer.from_settings(ws.root, {"command": CUSTOM, "timeout": 60})
    lab = Lab(ws, log=lambda msg: None)
    try:
        lab.run(proposer, max_trials=4)
    finally:
        lab.close()
    trials = Ledger(ws.ledger_path).trials()
    candidates = [t for t in trials if t.kind == Kind.CANDIDATE]
    assert [t.status for t in candidates] == [Status.CRASH, Status.EMPTY, Status.CRASH, Status.KEEP], \
        [t.reason for t in trials]
    failed, nothing, forbidden, good = candidates
    assert failed.description == "proposal failed: AgentError"
    assert failed.failure == Failure.PROPOSER and failed.reason.startswith("proposer error: the agent exited with code 1")
    assert failed.proposer_usage["exit_code"] == 1
    assert (nothing.description, nothing.reason) == ("no change", "no change: the proposal edited nothing")
    assert forbidden.failure == Failure.REJECTED_EDIT and "program.md" in forbidden.reason
    assert good.description == "raise LR from 0.003 to 0.03" and good.proposer == "agent"
    assert good.proposer_usage["description_from"] == "file" and good.proposer_usage["seconds"] > 0
    assert all("seconds" in t.proposer_usage for t in candidates)
    assert "LR = 0.03" in (ws.root / "train.py").read_text()
    assert "Also, the agent may edit" not in (ws.root / "program.md").read_text()
    assert git(ws.root, "status", "--porcelain") == ""
    # Each proposal was told what came before it.
    prompt = (ws.root / f".autoresearch/agent/{good.id:05d}/prompt.md").read_text()
    assert f"| {forbidden.id} | crash |" in prompt and "rejected edit" in prompt and "proposer error" in prompt
