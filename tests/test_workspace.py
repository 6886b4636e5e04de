"""Workspaces: a git repository per research run, with the harness fingerprint recorded."""
import json

import pytest

from autoresearch.harness import PROFILES, render_trainer
from autoresearch.lab.workspace import Workspace, WorkspaceError, git


def test_init_makes_a_repository_on_a_branch_with_the_profile_s_train_py(tmp_path, cpu_prepared):
    ws = Workspace.create(tmp_path / "ws", tag="nov24", profile="cpu", data=cpu_prepared)
    assert git(ws.root, "branch", "--show-current") == "autoresearch/nov24"
    assert git(ws.root, "ls-files").split() == [".gitignore", "autoresearch.toml", "program.md", "train.py"]
    assert (ws.root / "train.py").read_text() == render_trainer(PROFILES["cpu"])
    assert {"results.tsv", ".autoresearch/"} <= set((ws.root / ".gitignore").read_text().split())
    config = json.loads((ws.root / ".autoresearch" / "config.json").read_text())
    assert config["profile"] == "cpu" and config["base_commit"] == ws.head()
    assert config["fingerprint"]["tokenizer_sha256"] == cpu_prepared.tokenizer.sha256
    assert git(ws.root, "status", "--porcelain") == ""


def test_init_in_an_existing_repository_adds_a_branch_and_keeps_its_history(tmp_path, cpu_prepared):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "me@example.com")
    git(repo, "config", "user.name", "me")
    (repo / "notes.txt").write_text("mine\n")
    (repo / ".gitignore").write_text("*.pyc")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "mine")
    ws = Workspace.create(repo, tag="t1", profile="cpu", data=cpu_prepared)
    assert git(repo, "log", "--format=%s").splitlines() == ["baseline: train.py for profile cpu", "mine"]
    assert (repo / ".gitignore").read_text().splitlines()[0] == "*.pyc"
    assert git(repo, "rev-parse", "main") != ws.head()
    with pytest.raises(WorkspaceError, match="already a workspace"):
        Workspace.create(repo, tag="t2", profile="cpu", data=cpu_prepared)


def test_init_refuses_a_branch_that_exists(tmp_path, cpu_prepared):
    ws = Workspace.create(tmp_path / "ws", tag="a", profile="cpu", data=cpu_prepared)
    (ws.root / ".autoresearch" / "config.json").unlink()
    with pytest.raises(WorkspaceError, match="already exists"):
        Workspace.create(ws.root, tag="a", profile="cpu", data=cpu_prepared)


def test_a_workspace_is_found_from_a_folder_inside_it(tmp_path, cpu_prepared, monkeypatch):
    ws = Workspace.create(tmp_path / "ws", tag="a", profile="cpu", data=cpu_prepared)
    (ws.root / "sub").mkdir()
    monkeypatch.chdir(ws.root / "sub")
    assert Workspace.open().root == ws.root
    with pytest.raises(WorkspaceError, match="not inside an autoresearch workspace"):
        Workspace.open(tmp_path)


def test_a_changed_harness_fingerprint_stops_trials(tmp_path, cpu_prepared):
    ws = Workspace.create(tmp_path / "ws", tag="a", profile="cpu", data=cpu_prepared)
    ws.check_fingerprint()
    ws.config["fingerprint"]["harness_sha256"] = "0" * 64
    with pytest.raises(WorkspaceError, match="harness changed"):
        ws.check_fingerprint()


def test_changed_files_lists_edits_and_new_files_but_not_ignored_ones(tmp_path, cpu_prepared):
    ws = Workspace.create(tmp_path / "ws", tag="a", profile="cpu", data=cpu_prepared)
    (ws.root / "train.py").write_text("# edited\n")
    (ws.root / "new dir").mkdir()
    (ws.root / "new dir" / "x.py").write_text("")
    (ws.root / "results.tsv").write_text("ignored\n")
    assert ws.changed_files() == ["new dir/x.py", "train.py"]
    ws.reset_to(ws.head())
    assert ws.changed_files() == []
    assert (ws.root / "results.tsv").exists()  # the lab's files survive a reset
