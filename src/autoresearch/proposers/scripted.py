"""A proposer that plays back a fixed list of edits: for tests, and for trying a list of ideas.

The script is JSON: a list of {"description": "...", "replace": [[old, new], ...]} (exact text
substitutions in train.py) or {"description": "...", "files": {"name": "whole new content"}}.
The edits are handed out in order, once each, also to several trial slots at once; after a restart
the list goes on after the edits the ledger already holds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from autoresearch.lab.outcomes import RUN_AGAIN, Kind, Status
from autoresearch.lab.proposer import ProposalContext, Proposer


@dataclass
class ScriptedProposer(Proposer):
    edits: list[dict]
    name: str = "scripted"
    handed_out: int | None = field(default=None, repr=False)  # edits proposed so far; None: count the ledger's

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
        if self.handed_out is None:  # a stopped edit is run again by the lab, not proposed again
            self.handed_out = sum(1 for t in ctx.history if t.proposer == self.name and t.kind == Kind.CANDIDATE
                                  and t.status not in RUN_AGAIN and t.status != Status.SUPERSEDED)
        done = self.handed_out
        if done >= len(self.edits):
            return None
        self.handed_out += 1
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
