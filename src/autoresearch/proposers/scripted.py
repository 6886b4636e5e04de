"""A proposer that plays back a fixed list of edits: for tests, and for trying a list of ideas.

The script is JSON: a list of {"description": "...", "replace": [[old, new], ...]} (exact text
substitutions in train.py) or {"description": "...", "files": {"name": "whole new content"}}.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from autoresearch.lab.outcomes import RUN_AGAIN, Kind
from autoresearch.lab.proposer import ProposalContext, Proposer


@dataclass
class ScriptedProposer(Proposer):
    edits: list[dict]
    name: str = "scripted"

    @classmethod
    def from_file(cls, path: Path) -> "ScriptedProposer":
        try:
            edits = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the edit script {path}: {e}") from None
        if not isinstance(edits, list) or not all(isinstance(e, dict) and "description" in e for e in edits):
            raise ValueError(f"{path} must hold a JSON list of objects with a `description`")
        return cls(edits)

    def propose(self, ctx: ProposalContext) -> str | None:
        done = sum(1 for t in ctx.history if t.proposer == self.name and t.kind == Kind.CANDIDATE
                   and t.status not in RUN_AGAIN)  # a stopped edit is run again by the lab, not proposed again
        if done >= len(self.edits):
            return None
        edit = self.edits[done]
        for name, content in edit.get("files", {}).items():
            target = ctx.workspace / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        if edit.get("replace"):
            train = ctx.workspace / "train.py"
            text = train.read_text()
            for old, new in edit["replace"]:
                if old not in text:
                    raise ValueError(f"edit {done + 1} ({edit['description']}): {old!r} is not in train.py")
                text = text.replace(old, new, 1)
            train.write_text(text)
        return edit["description"]

    def tell(self, trial) -> None:
        pass
