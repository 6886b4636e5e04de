"""Workspaces: a git repository per research run, with the harness fingerprint recorded."""
import json

import pytest

from autoresearch.harness import PROFILES, render_trainer
from autoresearch.lab.workspace import Workspace, WorkspaceError, git
from lab_helpers import make_repository


def test_init_makes_a_repository_on_a_branch_with_the_profile_s_train_py(tmp_path, cpu_prepared):
    ws = Workspace.create(tmp_path / "ws", tag="nov24", profile="cpu", data=cpu_prepared)
    assert git(ws.root, "branch", "--show-current") == "autoresearch/nov24"
    assert git(ws.root, "ls-files").split() == [".gitignore", "program.md", "train.py"]
    assert (ws.root / "train.py").read_text() == render_trainer(PROFILES["cpu"])
    # The person's settings are theirs: ignored by git, so no reset of the branch ever touches them.
    assert (ws.root / "autoresearch.toml").is_file()
    assert {"results.tsv", ".autoresearch/", "autoresearch.toml"} <= set((ws.root / ".gitignore").read_text().split())
    config = json.loads((ws.root / ".autoresearch" / "config.json").read_text())
    assert config["profile"] == "cpu" and config["base_commit"] == ws.head()
    assert config["fingerprint"]["tokenizer_sha256"] == cpu_prepared.tokenizer.sha256
    assert git(ws.root, "status", "--porcelain") == ""


def test_init_in_an_existing_repository_adds_a_branch_and_keeps_its_history(tmp_path, cpu_prepared):
    repo = make_repository(tmp_path / "repo", {"notes.txt": "mine\n", ".gitignore": "*.pyc"}, "mine")
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


def test_a_reset_puts_back_train_py_and_touches_nothing_else(tmp_path, cpu_prepared):
    ws = Workspace.create(tmp_path / "ws", tag="a", profile="cpu", data=cpu_prepared)
    base = ws.head()
    (ws.root / "train.py").write_text("# a kept edit\n")
    kept = ws.commit(["train.py"], "an edit")
    (ws.root / "train.py").write_text("# a discarded edit\n")
    (ws.root / "notes.md").write_text("the person's notes\n")
    (ws.root / "autoresearch.toml").write_text("[run]\nmax_trials = 1\n")
    (ws.root / "results.tsv").write_text("ignored\n")
    ws.reset_to(base)
    assert ws.head() == base and (ws.root / "train.py").read_text() == ws.show(base, "train.py")
    assert ws.changed_files() == ["notes.md"]  # untracked, and left as it was
    assert (ws.root / "notes.md").read_text() == "the person's notes\n"
    assert (ws.root / "autoresearch.toml").read_text() == "[run]\nmax_trials = 1\n"
    assert (ws.root / "results.tsv").read_text() == "ignored\n"
    ws.reset_to(kept)
    assert (ws.root / "train.py").read_text() == "# a kept edit\n"


def test_init_refuses_to_write_over_a_train_py_git_does_not_keep(tmp_path, cpu_prepared):
    for folder, repository in (("plain", False), ("repo", True)):
        root = tmp_path / folder
        root.mkdir()
        if repository:
            git(root, "init", "-q")
        (root / "train.py").write_text("my own trainer\n")
        with pytest.raises(WorkspaceError, match="git does not track it"):
            Workspace.create(root, tag="a", profile="cpu", data=cpu_prepared)
        assert (root / "train.py").read_text() == "my own trainer\n"
        assert not (root / ".autoresearch").exists()


def test_the_person_s_untracked_and_ignored_files_are_named_as_theirs(tmp_path, cpu_prepared):
    repo = make_repository(tmp_path / "repo", {".gitignore": ".venv/\n"})
    (repo / ".venv").mkdir()
    (repo / ".venv" / "python").write_text("")
    (repo / "notes.txt").write_text("")
    ws = Workspace.create(repo, tag="a", profile="cpu", data=cpu_prepared)
    (ws.root / "results.tsv").write_text("")
    assert ws.untracked_and_ignored() == [".venv/", "notes.txt"]
