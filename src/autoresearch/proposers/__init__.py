"""Proposers: who writes the next change to train.py. Each implements lab.proposer.Proposer.

    search    tunes train.py's constants with Optuna's TPE sampler: offline, no LLM (the default)
    agent     runs a coding-agent CLI (Claude Code, Codex, aider, or any command) once per proposal
    llm       asks an LLM API (OpenAI-compatible or Anthropic) for search/replace edits
    scripted  plays back a fixed list of edits (tests, or a list of ideas to try)
"""
from __future__ import annotations

from pathlib import Path

NAMES = ("search", "agent", "llm", "scripted")


def make_proposer(name: str, workspace: Path, settings: dict, *, script: Path | None = None):
    """The proposer called `name`, configured by its table of the workspace's autoresearch.toml."""
    workspace = Path(workspace)
    if name == "search":
        from .search import SearchProposer

        return SearchProposer.from_settings(workspace, settings)
    if name == "agent":
        from .agent import AgentProposer

        return AgentProposer.from_settings(workspace, settings)
    if name == "llm":
        try:
            from .llm import LLMProposer
        except ImportError as e:
            raise ValueError(f"the llm proposer needs the API clients ({e.name} is missing): "
                             "pip install 'autoresearch[llm]'") from None
        return LLMProposer.from_settings(workspace, settings)
    if name == "scripted":
        from .scripted import ScriptedProposer

        script = script or settings.get("script")
        if script is None:
            raise ValueError("the scripted proposer needs --script FILE (a JSON list of edits)")
        return ScriptedProposer.from_file(workspace / script)
    raise ValueError(f"unknown proposer {name!r}; choose one of: {', '.join(NAMES)}")
