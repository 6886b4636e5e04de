"""Shared by the specifications: the shipped train.py template, the tiny real trainer, and
workspaces around it."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import autoresearch
from autoresearch.lab.decide import DecisionRule
from autoresearch.lab.ledger import Trial
from autoresearch.lab.workspace import Workspace

TEMPLATE = Path(autoresearch.__file__).parent / "templates" / "train.py"
TINY_TRAINER = (Path(__file__).parent / "trainers" / "tiny_train.py").read_text()


def load_script(path: Path = TEMPLATE, name: str = "train_under_test"):
    """A trainer script imported as a module (its training sits behind `__name__ == "__main__"`)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
EDITS = [  # for the scripted proposer, on the tiny trainer: a clear gain, a clear loss, a crash
    {"description": "LR 0.003 -> 0.03", "replace": [["LR = 0.003", "LR = 0.03"]]},
    {"description": "DIM 32 -> 2", "replace": [["DIM = 32", "DIM = 2"]]},
    {"description": "divide by zero", "replace": [["    run.training_started()\n",
                                                    "    run.training_started()\n    1 / 0\n"]]},
]


def variant(*replacements: tuple[str, str]) -> str:
    """The tiny trainer with exact substitutions, each of which must apply."""
    text = TINY_TRAINER
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


def make_repository(root: Path, committed: dict[str, str], message: str = "my work") -> Path:
    """A person's git repository on branch main holding `committed` (name -> text), as one commit."""
    from autoresearch.lab.workspace import git

    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "me@example.com")
    git(root, "config", "user.name", "me")
    for name, text in committed.items():
        (root / name).write_text(text)
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", message)
    return root


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for a parent that does not reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def make_workspace(root: Path, data, trainer: str = TINY_TRAINER, *, budget: float = 2.0,
                   baseline_runs: int = 2, rule: str = "noise", **config) -> Workspace:
    """A workspace of the tiny trainer; `rule="strict"` for tests about something other than the keep rule
    (one run per candidate, no runs of the best in between)."""
    ws = Workspace.create(root, tag="test", profile="cpu", data=data, trainer_source=trainer, time_budget=budget,
                          rule=DecisionRule(name=rule, baseline_runs=baseline_runs, drift_every=0))
    if config:
        ws.config.update(config)
        ws.save_config()
    return ws


def ledger_row(id: int, **fields) -> Trial:
    """A ledger row as proposers see it in their history: a discarded candidate unless `fields` say
    otherwise."""
    row = dict(id=id, kind="candidate", commit_sha=None, parent_sha=None, proposer="agent", description="an idea",
               diff="", seed=None, status="discard", failure=None, reason="", decision={}, val_bpb=1.0,
               trainer_summary={}, training_seconds=None, total_seconds=None, total_tokens_m=None, num_steps=None,
               mfu_percent=None, peak_vram_mb=None, hardware={}, device_class=None, tokens_per_second=None,
               sandboxed=True, proposer_usage={}, log_path="", started_at=0.0, ended_at=None)
    return Trial(**{**row, **fields})


def tagged_processes(tag: str) -> list[int]:
    """The processes whose environment holds a variable that starts with `tag` ("NAME=value...")."""
    needle = tag.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if any(v.startswith(needle) for v in (entry / "environ").read_bytes().split(b"\0")):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def trainer_processes(ws) -> list[int]:
    """The processes of this workspace's trials still alive (they carry its trial token)."""
    return tagged_processes(f"AUTORESEARCH_TRIAL={ws.config['id']}:")


def survivors(ws, within: float = 15.0) -> list[int]:
    """The workspace's trial processes still alive after up to `within` seconds. A dead lab's processes are
    killed one after another down the chain, as each one's parent dies, which is not instant on a loaded host."""
    deadline = time.monotonic() + within
    while (found := trainer_processes(ws)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found
