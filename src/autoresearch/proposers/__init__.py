"""Proposers: who writes the next change to train.py. Each implements lab.proposer.Proposer."""
from __future__ import annotations

from pathlib import Path

from .scripted import ScriptedProposer

NAMES = ("scripted",)


def make_proposer(name: str, workspace: Path, settings: dict, *, script: Path | None = None):
    """The proposer called `name`, configured by its table of the workspace's autoresearch.toml."""
    if name == "scripted":
        script = script or settings.get("script")
        if script is None:
            raise ValueError("the scripted proposer needs --script FILE (a JSON list of edits)")
        return ScriptedProposer.from_file(Path(workspace, script))
    raise ValueError(f"unknown proposer {name!r}; choose one of: {', '.join(NAMES)}")
