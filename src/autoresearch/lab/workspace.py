"""A workspace: the git repository of one research run, and the lab's folder inside it.

    train.py, program.md        tracked: the research surface and the agents' protocol
    autoresearch.toml           tracked: settings of the loop and its proposers (edited by people)
    results.tsv                 untracked: the reference's five-column record
    .autoresearch/              untracked: config, ledger, trial logs and checkpoints

The harness stays in the installed package, out of a proposer's reach; its fingerprint (code,
profile, tokenizer, data) is recorded when the workspace is made and checked before every trial.
The data and trainer template are imported where used: the report opens workspaces without numpy.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import autoresearch
from autoresearch.errors import UserError
from autoresearch.harness import get_profile
from autoresearch.harness.storage import write_json

from .decide import DecisionRule
from .limits import trainer_limit

if TYPE_CHECKING:
    from autoresearch.harness.dataset import PreparedData

LAB_DIR = ".autoresearch"
CONFIG_FILE = "config.json"
SETTINGS_FILE = "autoresearch.toml"
# Folders under .autoresearch/ that readers (the report) write while a trial may be running; the
# lab never reads them, so they are left out of the trial's tampering check.
READER_PATHS = ("report",)
GITIGNORE = "results.tsv\n.autoresearch/\n__pycache__/\nrun_output/\n"


class WorkspaceError(UserError):
    """A workspace in a state the lab must not work on; the message says how to fix it."""


def git(cwd: Path, *args: str, check: bool = True, strip: bool = True) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise WorkspaceError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip() if strip else proc.stdout


def harness_fingerprint(profile_name: str, data: PreparedData) -> dict:
    """What the measurements depend on besides train.py; a change makes old and new incomparable."""
    code = hashlib.sha256()
    harness_dir = resources.files("autoresearch") / "harness"
    for path in sorted(Path(str(harness_dir)).glob("*.py")):
        code.update(path.name.encode() + b"\0" + path.read_bytes())
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(data.path.glob("*.bin"))}
    return {"version": autoresearch.__version__, "harness_sha256": code.hexdigest(), "profile": profile_name,
            **data.fingerprint(), "data_files": files}


@dataclass
class Workspace:
    root: Path
    config: dict

    # --- making and opening ---------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, *, tag: str, profile: str, data: PreparedData,
               rule: DecisionRule | None = None, allowed_files: tuple[str, ...] = ("train.py",),
               trainer_source: str | None = None, time_budget: float | None = None) -> "Workspace":
        """Make a workspace; `trainer_source` replaces the template's train.py (bring your own),
        `time_budget` the profile's training seconds per trial."""
        from autoresearch.harness import render_trainer

        root = Path(root).resolve()
        if (root / LAB_DIR / CONFIG_FILE).exists():
            raise WorkspaceError(f"{root} is already a workspace; continue it with `autoresearch run {root}`.")
        root.mkdir(parents=True, exist_ok=True)
        branch = f"autoresearch/{tag}"
        if (root / ".git").exists():
            if git(root, "status", "--porcelain", "--untracked-files=no"):
                raise WorkspaceError(f"{root} has uncommitted changes; commit or stash them before `init`.")
            if git(root, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", check=False):
                raise WorkspaceError(f"Branch {branch} already exists in {root}; choose another --tag.")
            has_commits = bool(git(root, "rev-parse", "--verify", "--quiet", "HEAD", check=False))
            git(root, "checkout", "-q", "-b", branch) if has_commits else git(root, "checkout", "-q", "--orphan", branch)
        else:
            git(root, "init", "-q", "-b", branch)
        for key, value in (("user.name", "autoresearch"), ("user.email", "autoresearch@localhost")):
            if not git(root, "config", "--get", key, check=False):
                git(root, "config", key, value)
        (root / "train.py").write_text(trainer_source if trainer_source is not None else render_trainer(get_profile(profile)))
        templates = resources.files("autoresearch").joinpath("templates")
        (root / "program.md").write_text(templates.joinpath("program.md").read_text())
        if not (root / SETTINGS_FILE).exists():
            (root / SETTINGS_FILE).write_text(templates.joinpath(SETTINGS_FILE).read_text())
        ignore = root / ".gitignore"
        existing = ignore.read_text().splitlines() if ignore.exists() else []
        ignore.write_text("\n".join(existing + [line for line in GITIGNORE.split() if line not in existing]) + "\n")
        git(root, "add", "train.py", "program.md", SETTINGS_FILE, ".gitignore")
        git(root, "commit", "-q", "-m", f"baseline: train.py for profile {profile}")
        config = {
            "version": 1,
            "id": uuid.uuid4().hex[:12],
            "tag": tag,
            "branch": branch,
            "profile": profile,
            "data": str(data.path),
            "allowed_files": list(allowed_files),
            "decision": (rule or DecisionRule()).to_dict(),
            "time_budget": time_budget,  # seconds; None: the profile's
            "grace_seconds": None,  # beyond the budget before the trainer is killed; None: max(budget, 300)
            "training_tolerance": 0.05,  # how far past the budget the lab's clock may find training
            "warmup_cap_seconds": 180.0 if profile != "cpu" else 60.0,
            "base_commit": git(root, "rev-parse", "HEAD"),
            "fingerprint": harness_fingerprint(profile, data),
            "created_at": time.time(),
        }
        write_json(root / LAB_DIR / CONFIG_FILE, config)
        return cls(root, config)

    @classmethod
    def open(cls, root: Path | None = None) -> "Workspace":
        """The workspace at `root`, or the one containing the current directory."""
        start = Path(root or Path.cwd()).resolve()
        for folder in (start, *start.parents):
            config_path = folder / LAB_DIR / CONFIG_FILE
            if config_path.is_file():
                try:
                    return cls(folder, json.loads(config_path.read_text()))
                except (OSError, json.JSONDecodeError) as e:
                    raise WorkspaceError(f"{config_path} cannot be read ({e}); is the workspace damaged?") from None
            if root is not None:
                break
        raise WorkspaceError(
            f"{start} is not inside an autoresearch workspace. Make one with `autoresearch init DIR "
            "--profile cpu` (or h100, gpu24), or pass the workspace's path."
        )

    def save_config(self) -> None:
        write_json(self.lab_dir / CONFIG_FILE, self.config)

    # --- paths and settings ----------------------------------------------------------------------
    @property
    def lab_dir(self) -> Path:
        return self.root / LAB_DIR

    @property
    def ledger_path(self) -> Path:
        return self.lab_dir / "ledger.db"

    @property
    def results_tsv(self) -> Path:
        return self.root / "results.tsv"

    def trial_dir(self, trial_id: int) -> Path:
        return self.lab_dir / "trials" / f"{trial_id:05d}"

    @property
    def profile(self):
        return get_profile(self.config["profile"])

    @property
    def rule(self) -> DecisionRule:
        return DecisionRule(**self.config["decision"])

    @property
    def time_budget(self) -> float:
        return float(self.config["time_budget"] or self.profile.time_budget)

    @property
    def time_limit(self) -> float:
        """Wall-clock seconds after which the trainer's whole process group is killed."""
        return trainer_limit(self.time_budget, self.config["grace_seconds"])

    def settings(self) -> dict:
        """autoresearch.toml as a dict of tables ({} when the file is absent)."""
        path = self.root / SETTINGS_FILE
        if not path.is_file():
            return {}
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            return tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise WorkspaceError(f"{path} is not valid TOML: {e}. Fix the file (or delete it for the defaults).") from None

    def open_data(self) -> PreparedData:
        from autoresearch.harness import PreparedData

        return PreparedData.open(Path(self.config["data"]), self.profile)

    # --- checks ----------------------------------------------------------------------------------
    def check_fingerprint(self) -> None:
        now = harness_fingerprint(self.config["profile"], self.open_data())
        recorded = self.config["fingerprint"]
        changed = sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))
        if changed:
            raise WorkspaceError(
                f"The harness changed since this workspace was made ({', '.join(changed)} differ), so new "
                "measurements would not be comparable with the recorded ones. Reinstall the autoresearch "
                f"version {recorded.get('version')} and restore the prepared data, or start a new workspace."
            )

    # --- git -------------------------------------------------------------------------------------
    def head(self) -> str:
        return git(self.root, "rev-parse", "HEAD")

    def changed_files(self) -> list[str]:
        """Tracked files that differ from HEAD and untracked files git does not ignore."""
        out = git(self.root, "status", "--porcelain", "--untracked-files=all", "-z", strip=False)
        names = []
        entries = iter(out.split("\0"))
        for entry in entries:
            if not entry:
                continue
            status, name = entry[:2], entry[3:]
            names.append(name)
            if "R" in status or "C" in status:
                next(entries, None)  # the rename's source follows
        return sorted(set(names))

    def commit(self, files: list[str], message: str) -> str:
        git(self.root, "add", "--", *files)
        git(self.root, "commit", "-q", "--no-verify", "-m", message)
        return self.head()

    def diff(self, parent: str, child: str) -> str:
        return git(self.root, "diff", parent, child)

    def working_diff(self) -> str:
        git(self.root, "add", "-N", ".", check=False)  # show new files in the diff too
        return git(self.root, "diff", "HEAD")

    def reset_to(self, sha: str) -> None:
        """Back to `sha`, with every tracked and untracked file (but the lab's) as it was there."""
        git(self.root, "reset", "-q", "--hard", sha)
        self.clean()

    def clean(self) -> None:
        """Remove every untracked file, ignored ones included, but the lab's."""
        git(self.root, "clean", "-q", "-fdx", "-e", LAB_DIR, "-e", "results.tsv")
