"""A workspace: the git repository of one research run, and the lab's folder inside it.

    train.py, program.md        tracked: the research surface and the agents' protocol
    autoresearch.toml           ignored: the person's settings of the loop and its proposers
    results.tsv                 ignored: the reference's five-column record
    .autoresearch/              ignored: config, ledger, trial logs and checkpoints

The workspace may be a branch of a repository that holds other work. The lab only ever writes
train.py (the allowed files), the branch, and its own folder: it never cleans, resets or deletes
anything else, tracked or not, ignored or not; trials run in sandboxes that cannot see the
repository at all. The harness stays in the installed package, out of a proposer's reach; its
fingerprint (code, profile, tokenizer, data) is recorded when the workspace is made and checked,
with the lab's own config, by content before every trial. One lab at a time holds a workspace
(`lock`). The data and trainer template are imported where used: the report opens workspaces
without numpy.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import autoresearch
from autoresearch.errors import UserError
from autoresearch.harness import get_profile
from autoresearch.harness.storage import write_json

from .decide import DecisionRule
from .limits import SCORING_LIMIT

if TYPE_CHECKING:
    from autoresearch.harness.dataset import PreparedData

LAB_DIR = ".autoresearch"
CONFIG_FILE = "config.json"
SETTINGS_FILE = "autoresearch.toml"
LOCK_FILE = "lock"
REPORT_DIR = "report"  # under .autoresearch/: what `autoresearch report` writes
WORKTREES_DIR = "worktrees"  # under .autoresearch/: slot-K, where trial slot K proposes
GITIGNORE = f"results.tsv\n{LAB_DIR}/\n{SETTINGS_FILE}\n__pycache__/\nrun_output/\n"
# Files git ignores (so that no reset of the branch touches them) but a proposal must still not change.
WATCHED = (SETTINGS_FILE,)


class WorkspaceError(UserError):
    """A workspace in a state the lab must not work on; the message says how to fix it."""


class WorkspaceBusy(WorkspaceError):
    """Another lab holds the workspace."""


def git(cwd: Path, *args: str, check: bool = True, strip: bool = True) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise WorkspaceError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip() if strip else proc.stdout


def apply_lines(repo: Path, parent: str, child: str, folder: Path, *names: str, reverse: bool = False) -> bool:
    """Apply the change from `parent` to `child` of `repo` (of `names`, else of every file) to the files in
    `folder`, or with `reverse` undo it there. The changed lines go without context around them, so that a
    change of one line applies (or is undone) beside another change of the next line. False, with nothing
    changed, where it does not apply."""
    patch = git(repo, "diff", "-U0", parent, child, "--", *names, strip=False)
    command = ["git", "apply", "--unidiff-zero", "--whitespace=nowarn", *(["-R"] if reverse else []), "-"]
    return subprocess.run(command, cwd=folder, input=patch, text=True, capture_output=True).returncode == 0


def identity(repo: Path) -> list[str]:
    """git options naming the lab as the author where git knows no one (a lab started under another
    HOME than the workspace was made under, a cluster's service account): else nothing."""
    if git(repo, "config", "--get", "user.email", check=False):
        return []
    return ["-c", "user.name=autoresearch", "-c", "user.email=autoresearch@localhost"]


def harness_fingerprint(profile_name: str, data: PreparedData) -> dict:
    """What the measurements depend on besides train.py; a change makes old and new incomparable."""
    code = hashlib.sha256()
    harness_dir = resources.files("autoresearch") / "harness"
    for path in sorted(Path(str(harness_dir)).glob("*.py")):
        code.update(path.name.encode() + b"\0" + path.read_bytes())
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(data.path.glob("*.bin"))}  # hashed in data
    return {"version": autoresearch.__version__, "harness_sha256": code.hexdigest(), "profile": profile_name,
            **data.fingerprint(), "data_files": files}


class Tree:
    """A git working tree of the workspace's repository: the workspace's own, or a worktree of the
    lab's where a trial slot proposes (Workspace.worktrees). What it does to files touches the
    allowed files and, to undo a proposal, exactly the files that proposal changed."""

    root: Path

    @property
    def allowed_files(self) -> list[str]:
        raise NotImplementedError

    def head(self) -> str:
        return git(self.root, "rev-parse", "HEAD")

    def show(self, commit: str, name: str) -> str:
        """The file `name` as it is in `commit`."""
        return git(self.root, "show", f"{commit}:{name}", strip=False)

    def blob_ids(self, commits: list[str], name: str = "train.py") -> list[str]:
        """Git's id of `name`'s content in each of `commits`."""
        return git(self.root, "rev-parse", *(f"{c}:{name}" for c in commits)).split()

    def status(self) -> dict[str, str]:
        """Tracked files that differ from HEAD and untracked files git does not ignore: {path: status}."""
        out = git(self.root, "status", "--porcelain", "--untracked-files=all", "-z", strip=False)
        names = {}
        entries = iter(out.split("\0"))
        for entry in entries:
            if not entry:
                continue
            status, name = entry[:2], entry[3:]
            names[name] = status
            if "R" in status or "C" in status:
                next(entries, None)  # the rename's source follows
        return names

    def changed_files(self) -> list[str]:
        return sorted(self.status())

    def snapshot(self) -> dict[str, bytes | None]:
        """The content of every file that differs from HEAD, and of the WATCHED ones (None: absent), to
        tell afterwards what a proposal changed, and to put back exactly that."""
        out = {}
        for name in [*self.status(), *WATCHED]:
            path = self.root / name
            out[name] = path.read_bytes() if path.is_file() else None
        return out

    def changed_since(self, before: dict[str, bytes | None]) -> list[str]:
        """Files whose content is not what `before` (a snapshot) says, files that differed from HEAD then
        and that no longer do included."""
        now = self.status()
        changed = []
        for name in set(now) | set(before) | set(WATCHED):
            path = self.root / name
            content = path.read_bytes() if path.is_file() else None
            if name in before:
                if content != before[name]:
                    changed.append(name)
            elif name in now:
                changed.append(name)
        return sorted(changed)

    def restore(self, before: dict[str, bytes | None], names: list[str]) -> None:
        """Put `names` back as `before` has them, or as HEAD has them where `before` does not list them."""
        for name in names:
            path = self.root / name
            if name in before:
                if before[name] is None:
                    path.unlink(missing_ok=True)
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(before[name])
            elif self._tracked(name):
                git(self.root, "checkout", "HEAD", "--", name)
            else:
                path.unlink(missing_ok=True)  # made by the proposal: it did not exist before

    def _tracked(self, name: str) -> bool:
        return subprocess.run(["git", "cat-file", "-e", f"HEAD:{name}"], cwd=self.root, capture_output=True).returncode == 0

    def commit(self, files: list[str], message: str) -> str:
        git(self.root, "add", "--", *files)
        git(self.root, *identity(self.root), "commit", "-q", "--no-verify", "-m", message, "--", *files)
        return self.head()

    def diff(self, parent: str, child: str) -> str:
        return git(self.root, "diff", parent, child)

    def working_diff(self, names: list[str]) -> str:
        """The diff of `names` against HEAD, new files included."""
        parts = []
        for name in names:
            if self._tracked(name):
                parts.append(git(self.root, "diff", "HEAD", "--", name))
            elif (self.root / name).is_file():
                parts.append(git(self.root, "diff", "--no-index", "/dev/null", name, check=False))
        return "\n".join(p for p in parts if p)

    def reset_to(self, sha: str) -> None:
        """Point the branch at `sha` and put the allowed files as they are there. Nothing else is
        touched: not other tracked files, not untracked or ignored ones."""
        git(self.root, "reset", "-q", "--soft", sha)
        allowed = [f for f in self.allowed_files if self._tracked(f)]
        if allowed:
            git(self.root, "checkout", sha, "--", *allowed)

    def reapply(self, parent: str, child: str) -> bool:
        """Apply the change from `parent` to `child` onto the working tree; False, with nothing changed,
        where it does not apply (apply_lines)."""
        return apply_lines(self.root, parent, child, self.root)


@dataclass
class Worktree(Tree):
    """A detached worktree under .autoresearch/worktrees/: where one trial slot's proposals are made
    and committed, beside the branch, which moves only when a change is kept."""

    root: Path
    allowed: list[str]

    @property
    def allowed_files(self) -> list[str]:
        return list(self.allowed)


@dataclass
class Workspace(Tree):
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
        templates = resources.files("autoresearch").joinpath("templates")
        written = {"train.py": trainer_source if trainer_source is not None else render_trainer(get_profile(profile)),
                   "program.md": templates.joinpath("program.md").read_text()}
        repository = (root / ".git").exists()
        for name, text in written.items():  # a file of that name that git does not keep would be lost
            path = root / name
            if path.exists() and path.read_text(errors="replace") != text and not (
                    repository and git(root, "ls-files", "--", name, check=False)):
                raise WorkspaceError(f"{path} exists and git does not track it: `init` would write its own {name} "
                                     "over it. Commit it, or move it away, and run `init` again.")
        if repository:
            if git(root, "status", "--porcelain", "--untracked-files=no"):
                raise WorkspaceError(f"{root} has uncommitted changes; commit or stash them before `init`.")
            if git(root, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", check=False):
                raise WorkspaceError(f"Branch {branch} already exists in {root}; choose another --tag.")
            has_commits = bool(git(root, "rev-parse", "--verify", "--quiet", "HEAD", check=False))
            git(root, "checkout", "-q", "-b", branch) if has_commits else git(root, "checkout", "-q", "--orphan", branch)
        else:
            git(root, "init", "-q", "-b", branch)
        for name, text in written.items():
            (root / name).write_text(text)
        if not (root / SETTINGS_FILE).exists():
            (root / SETTINGS_FILE).write_text(templates.joinpath(SETTINGS_FILE).read_text())
        ignore = root / ".gitignore"
        existing = ignore.read_text().splitlines() if ignore.exists() else []
        ignore.write_text("\n".join(existing + [line for line in GITIGNORE.split() if line not in existing]) + "\n")
        git(root, "add", "train.py", "program.md", ".gitignore")
        git(root, *identity(root), "commit", "-q", "-m", f"baseline: train.py for profile {profile}")
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
            "startup_limit": None,  # seconds from launch to training_started(); None: limits.startup_limit
            "training_tolerance": 0.05,  # how far past the budget the lab's clock may find training
            "scoring_limit": SCORING_LIMIT,  # seconds to rebuild and score the model, from the hand-in
            "memory_bytes": None,  # each sandboxed process's memory limit (RLIMIT_DATA); None: 80% of the machine's
            "max_processes": None,  # processes and threads of a sandbox (RLIMIT_NPROC); None: 4096
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

    @property
    def allowed_files(self) -> list[str]:
        return list(self.config["allowed_files"])

    def trial_dir(self, trial_id: int) -> Path:
        return self.lab_dir / "trials" / f"{trial_id:05d}"

    @property
    def profile(self):
        return get_profile(self.config["profile"])

    @property
    def rule(self) -> DecisionRule:
        return DecisionRule.from_dict(self.config["decision"])

    @property
    def time_budget(self) -> float:
        return float(self.config["time_budget"] or self.profile.time_budget)

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

    def integrity(self) -> dict:
        """What must not change while a trial or a proposal runs, by content: the lab's config, the
        harness's code, and the data files (by size, time and inode; they are hashed when prepared)."""
        config = self.lab_dir / CONFIG_FILE
        code = hashlib.sha256()
        for path in sorted(Path(str(resources.files("autoresearch") / "harness")).glob("*.py")):
            code.update(path.name.encode() + b"\0" + path.read_bytes())
        data = {}
        for path in sorted(Path(self.config["data"]).glob("*")):
            st = path.stat()
            data[path.name] = [st.st_size, st.st_mtime_ns, st.st_ino]
        return {"config": hashlib.sha256(config.read_bytes()).hexdigest() if config.exists() else None,
                "harness": code.hexdigest(), "data": data}

    def check_integrity(self, before: dict) -> None:
        now = self.integrity()
        what = {"config": f"{LAB_DIR}/{CONFIG_FILE}", "harness": "the installed harness's code",
                "data": f"the prepared data in {self.config['data']}"}
        changed = [what[k] for k in before if before[k] != now.get(k)]
        if changed:
            raise WorkspaceError(f"{' and '.join(changed)} changed while it ran")

    # --- one lab at a time ------------------------------------------------------------------------
    @contextmanager
    def lock(self, command: str):
        """Hold the workspace for this process; a second lab (run, baseline, trial) is refused with the
        holder's pid and command. The kernel releases the lock when its holder dies, even by kill -9."""
        path = self.lab_dir / LOCK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise WorkspaceBusy(f"{self.root} is in use by {holder}. It was left as it is; stop that one first "
                                "(Ctrl-C in its terminal), or wait for it.") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} (autoresearch {command}, started {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            handle.flush()
            yield
        finally:
            handle.close()  # releases the lock

    def holder(self) -> str | None:
        """Who holds the workspace now, or None (for readers: the report, status)."""
        path = self.lab_dir / LOCK_FILE
        if not path.exists():
            return None
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                return handle.read().strip() or "another process"
        return None

    # --- git beyond the working tree ------------------------------------------------------------
    def untracked_and_ignored(self) -> list[str]:
        """The person's files git does not track (untracked or ignored), the lab's own left out."""
        out = git(self.root, "status", "--porcelain", "--ignored", "--untracked-files=normal", "-z", strip=False)
        ours = {"results.tsv", f"{LAB_DIR}/", SETTINGS_FILE}
        return sorted(e[3:] for e in out.split("\0") if e[:2] in ("??", "!!") and e[3:] not in ours)

    def subject(self, commit: str) -> str:
        """The first line of a commit's message: for a kept change, its description."""
        return git(self.root, "log", "-1", "--format=%s", commit)

    def kept_commits(self, best: str) -> list[str]:
        """The commits between the baseline and `best` on the branch, oldest first: the kept changes."""
        return git(self.root, "rev-list", "--reverse", f"{self.config['base_commit']}..{best}").split()

    def without(self, best: str, change: str, name: str = "train.py") -> str | None:
        """`name` as it is in `best` with `change` (a commit below it) undone alone, or None when later
        changes rewrote its lines. The change's lines are reversed with no context around them, so that a
        change of one constant is undone beside another kept change of the next line."""
        with tempfile.TemporaryDirectory(prefix="autoresearch-revert-") as tmp:
            (Path(tmp) / name).write_text(self.show(best, name))
            undone = apply_lines(self.root, f"{change}^", change, Path(tmp), name, reverse=True)
            return (Path(tmp) / name).read_text() if undone else None

    def commit_aside(self, parent: str, files: dict[str, str], message: str) -> str:
        """A commit of `parent` with `files` replaced, made without touching the branch, the index or the
        working tree (for measuring a variant of the best); a ref under refs/autoresearch/ keeps it."""
        with tempfile.TemporaryDirectory(prefix="autoresearch-index-") as tmp:
            env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
            run = lambda *args, **kw: subprocess.run(["git", *args], cwd=self.root, env=env, check=True,  # noqa: E731
                                                     capture_output=True, text=True, **kw).stdout.strip()
            run("read-tree", parent)
            for name, text in files.items():
                blob = run("hash-object", "-w", "--stdin", input=text)
                run("update-index", "--add", "--cacheinfo", f"100644,{blob},{name}")
            sha = run(*identity(self.root), "commit-tree", run("write-tree"), "-p", parent, "-m", message)
        git(self.root, "update-ref", f"refs/autoresearch/aside/{sha}", sha)
        return sha

    # --- the lab's worktrees ------------------------------------------------------------------------
    def worktrees(self, n: int, commit: str) -> list[Worktree]:
        """Worktrees slot-0 .. slot-(n-1), detached at `commit`, one per trial slot. A worktree a lab
        left (stopped, or killed mid-proposal) is reused: put back at `commit`, what a proposal left
        in it removed, its ignored files (an agent's notes) kept. Registrations whose folder is gone
        are pruned, so none is ever left orphaned."""
        base = self.lab_dir / WORKTREES_DIR
        base.mkdir(parents=True, exist_ok=True)
        git(self.root, "worktree", "prune")
        listed = git(self.root, "worktree", "list", "--porcelain")
        registered = {Path(line[len("worktree "):]).resolve() for line in listed.splitlines()
                      if line.startswith("worktree ")}
        trees = []
        for k in range(n):
            path = (base / f"slot-{k}").resolve()
            if path in registered and (path / ".git").exists():
                git(path, "checkout", "-q", "-f", "--detach", commit)
                git(path, "clean", "-q", "-f", "-d")  # untracked, not ignored: a dead proposal's
            else:
                shutil.rmtree(path, ignore_errors=True)
                git(self.root, "worktree", "add", "-q", "--detach", str(path), commit)
            trees.append(Worktree(path, self.allowed_files))
        return trees
