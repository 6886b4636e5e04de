"""Shared by the lab's specifications: workspaces around the tiny real trainer."""
from __future__ import annotations

from pathlib import Path

from autoresearch.lab.decide import DecisionRule
from autoresearch.lab.workspace import Workspace

TINY_TRAINER = (Path(__file__).parent / "trainers" / "tiny_train.py").read_text()


def variant(*replacements: tuple[str, str]) -> str:
    """The tiny trainer with exact substitutions, each of which must apply."""
    text = TINY_TRAINER
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


def make_workspace(root: Path, data, trainer: str = TINY_TRAINER, *, budget: float = 2.0,
                   baseline_runs: int = 2, **config) -> Workspace:
    ws = Workspace.create(root, tag="test", profile="cpu", data=data, trainer_source=trainer,
                          rule=DecisionRule(baseline_runs=baseline_runs, drift_every=0))
    ws.config.update({"time_budget": budget, **config})
    ws.save_config()
    return ws
