"""The `search` proposer: Optuna's TPE over the constants at the top of train.py, offline.

Specifications: the space it reads from the real template, edits that touch only the chosen
literals, the [search] overrides and their errors, outcomes told to the study, resume after a
restart, and the real loop end to end with the tiny trainer.
"""
from __future__ import annotations

import ast
import difflib
import re
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path

import pytest
from lab_helpers import ledger_row, make_workspace

from autoresearch.harness import get_profile, render_trainer
from autoresearch.lab.ledger import Trial
from autoresearch.lab.proposer import ProposalContext
from autoresearch.proposers.search import SearchProposer
from autoresearch.proposers.space import build_space, fit_batch, parse_constants

CHANGE = re.compile(r"^([A-Z][A-Z0-9_]*) (\S+|\(.*?\)) -> (\S+|\(.*?\))$")


def template() -> str:
    return resources.files("autoresearch").joinpath("templates", "train.py").read_text()


def workspace(tmp_path: Path, text: str | None = None) -> Path:
    """A folder with train.py (the template rendered for the cpu profile, unless given)."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / "train.py").write_text(render_trainer(get_profile("cpu")) if text is None else text)
    return root


def context(root: Path, history: list[Trial] | None = None) -> ProposalContext:
    return ProposalContext(root, ["train.py"], "cpu", 60.0, "0" * 40, 2.0, 0.01, history or [], seq_len=256)


def ledger_trial(id: int, description: str = "", status: str = "discard", val_bpb: float | None = 2.0,
                 reason: str = "", values: list[float] | None = None, usage: dict | None = None) -> Trial:
    """The row the lab records for a proposal: with `usage`, the proposer's last_usage, as the lab
    stores it (that names the Optuna trial)."""
    decision = {"values": values} if values else {}
    return ledger_row(id, proposer="search", description=description, status=status, reason=reason,
                      decision=decision, val_bpb=val_bpb, proposer_usage=dict(usage or {}))


def changes(description: str) -> dict[str, tuple[str, str]]:
    out = {}
    for part in _split(description):
        m = CHANGE.match(part)
        assert m, f"not of the form `NAME old -> new`: {part!r} in {description!r}"
        out[m.group(1)] = (m.group(2), m.group(3))
    return out


def _split(description: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in description:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return parts + [current.strip()]


# --- the space ------------------------------------------------------------------------------------
def test_the_space_is_read_from_the_template():
    constants = parse_constants(template())
    space = build_space({n: c.value for n, c in constants.items()})
    for name in ("EMBEDDING_LR", "UNEMBEDDING_LR", "MATRIX_LR", "SCALAR_LR"):
        p, value = space[name], constants[name].value
        assert (p.kind, p.log) == ("float", True) and p.low == pytest.approx(value / 4) and p.high == pytest.approx(value * 4)
    assert (space["DEPTH"].kind, space["DEPTH"].low, space["DEPTH"].high) == ("int", 4, 12)
    for name, value in (("TOTAL_BATCH_SIZE", 2**19), ("DEVICE_BATCH_SIZE", 128)):
        p = space[name]
        assert p.kind == "pow2" and (2 ** p.low, 2 ** p.high) == (value // 4, value * 4)
    assert space["WINDOW_PATTERN"].kind == "choice" and set(space["WINDOW_PATTERN"].choices) == {"L", "SL", "SSL", "SSSL"}
    assert [e.kind for e in space["ADAM_BETAS"].elements] == ["float", "float"]
    for name in ("WARMUP_RATIO", "WARMDOWN_RATIO", "FINAL_LR_FRAC"):
        assert (space[name].kind, space[name].low, space[name].high) == ("float", 0.0, 1.0)
    assert space["WEIGHT_DECAY"].kind == "float"
    assert "SEED" in constants and "SEED" not in space  # a seed is not a hyperparameter
    assert "ASPECT_RATIO" not in space  # an int named *_RATIO is not a ratio
    assert "PEAK_FLOPS" not in constants  # a multi-line list is not a rewritable literal
    assert {"HEAD_DIM", "SOFTCAP", "ROPE_BASE", "EVAL_BATCH_TOKENS"}.isdisjoint(space)  # left alone


def test_only_single_line_literals_bound_once_at_the_top_count():
    text = ("import os\nA = 1  # one\nB: float = 2.5\nC = os.getcwd()\nD = [\n  1,\n]\nE = 3\nE = 4\n"
            "F = 5\nlower = 6\n\ndef f():\n    global F\n    F = 7\n\nG = 8\n")
    assert list(parse_constants(text)) == ["A", "B"]


# --- edits ----------------------------------------------------------------------------------------
def test_an_edit_rewrites_only_the_chosen_values_and_keeps_comments(tmp_path):
    root = workspace(tmp_path)
    original = (root / "train.py").read_text()
    proposer = SearchProposer.from_settings(root, {"seed": 3})
    before = parse_constants(original)
    for _ in range(8):
        (root / "train.py").write_text(original)
        description = proposer.propose(context(root))
        edited = (root / "train.py").read_text()
        ast.parse(edited)
        changed = changes(description)
        assert 1 <= len(changed) <= 4  # 1-3 drawn, and a batch size the batch rule had to adjust
        after = parse_constants(edited)
        diff = [line for line in difflib.unified_diff(original.splitlines(), edited.splitlines(), n=0, lineterm="")
                if line[:1] in "+-" and line[:3] not in ("+++", "---")]
        assert len(diff) == 2 * len(changed)
        for name, (old, new) in changed.items():
            c = before[name]
            assert (c.source, after[name].source) == (old, new) and old != new
            old_line, new_line = original.splitlines()[c.line - 1], edited.splitlines()[c.line - 1]
            assert f"-{old_line}" in diff and f"+{new_line}" in diff
            assert new_line.endswith(old_line[c.end:]) and "#" in old_line[c.end:]  # the comment stays
        assert len(original) - len(edited) == sum(len(o) - len(n) for o, n in changed.values())
        assert TOTAL_OK(after["TOTAL_BATCH_SIZE"].value, after["DEVICE_BATCH_SIZE"].value, 256)
        proposer.tell(ledger_trial(10 + proposer.study.trials[-1].number, description, usage=proposer.last_usage))


def TOTAL_OK(total: int, device: int, seq_len: int) -> bool:
    return total & (total - 1) == 0 and device & (device - 1) == 0 and total % (device * seq_len) == 0


def test_the_batch_rule_halves_the_device_batch():
    current = {"TOTAL_BATCH_SIZE": 4096, "DEVICE_BATCH_SIZE": 16}
    assert fit_batch({"TOTAL_BATCH_SIZE": 1024}, current, 256) == {"TOTAL_BATCH_SIZE": 1024, "DEVICE_BATCH_SIZE": 4}
    assert fit_batch({"DEVICE_BATCH_SIZE": 64}, current, 256) == {"DEVICE_BATCH_SIZE": 16}
    assert fit_batch({"DEVICE_BATCH_SIZE": 8}, current, 256) == {"DEVICE_BATCH_SIZE": 8}
    # Without a known seq_len the current ratio stands in for it: never less accumulation than now.
    h100 = {"TOTAL_BATCH_SIZE": 2**19, "DEVICE_BATCH_SIZE": 128}  # seq_len 2048 x 2 accumulation steps
    assert fit_batch({"DEVICE_BATCH_SIZE": 512}, h100, None) == {"DEVICE_BATCH_SIZE": 128}
    assert fit_batch({"DEVICE_BATCH_SIZE": 64}, h100, None) == {"DEVICE_BATCH_SIZE": 64}
    assert fit_batch({"DEVICE_BATCH_SIZE": 512}, h100, 2048) == {"DEVICE_BATCH_SIZE": 256}


def test_a_proposal_never_leaves_the_file_as_it_was(tmp_path):
    text = 'A = 1  # not searched\nW = "L"  # a pattern\n'
    root = workspace(tmp_path, text)
    proposer = SearchProposer.from_settings(root, {"space": {"W": {"choices": ["L", "SL"]}}})
    for i in range(4):
        (root / "train.py").write_text(text)
        assert proposer.propose(context(root)) == 'W "L" -> "SL"'
        assert (root / "train.py").read_text() == 'A = 1  # not searched\nW = "SL"  # a pattern\n'
        proposer.tell(ledger_trial(i + 1, status="discard", val_bpb=2.0, usage=proposer.last_usage))
    (root / "train.py").write_text(text)
    stuck = SearchProposer.from_settings(root, {"space": {"W": {"choices": ["L"]}}})
    assert stuck.propose(context(root)) is None  # nothing can change: out of ideas


# --- configuration ------------------------------------------------------------------------------
def test_overrides_set_ranges_and_include_and_exclude(tmp_path):
    root = workspace(tmp_path)
    original = (root / "train.py").read_text()
    settings = {"seed": 0, "changes": 0, "include": ["HEAD_DIM"], "exclude": ["WEIGHT_DECAY"],
                "space": {"MATRIX_LR": {"low": 0.01, "high": 0.1, "log": True}, "DEPTH": {"low": 2, "high": 12},
                          "WINDOW_PATTERN": {"choices": ["L", "SSSL"]}, "ADAM_BETAS[1]": {"low": 0.9, "high": 0.99},
                          "TOTAL_BATCH_SIZE": {"low": 2048, "high": 8192}}}
    proposer = SearchProposer.from_settings(root, settings)
    space = proposer.space
    assert "WEIGHT_DECAY" not in space and space["HEAD_DIM"].kind == "int"
    assert (space["MATRIX_LR"].low, space["MATRIX_LR"].high, space["MATRIX_LR"].log) == (0.01, 0.1, True)
    assert (space["DEPTH"].low, space["DEPTH"].high) == (2, 12)
    assert space["WINDOW_PATTERN"].choices == ("L", "SSSL")
    assert (space["ADAM_BETAS"].elements[1].low, space["ADAM_BETAS"].elements[0].low) == (0.9, 0.65)
    for i in range(6):
        (root / "train.py").write_text(original)
        proposer.propose(context(root))
        values = {n: c.value for n, c in parse_constants((root / "train.py").read_text()).items()}
        assert 0.01 <= values["MATRIX_LR"] <= 0.1 and 2 <= values["DEPTH"] <= 12
        assert values["WINDOW_PATTERN"] in ("L", "SSSL") and 0.9 <= values["ADAM_BETAS"][1] <= 0.99
        assert 2048 <= values["TOTAL_BATCH_SIZE"] <= 8192 and values["WEIGHT_DECAY"] == 0.2
        assert TOTAL_OK(values["TOTAL_BATCH_SIZE"], values["DEVICE_BATCH_SIZE"], 256)
        proposer.tell(ledger_trial(i + 1, status="discard", val_bpb=2.0 + i, usage=proposer.last_usage))


@pytest.mark.parametrize("settings, message", [
    ({"space": {"NOT_THERE": {"low": 1, "high": 2}}}, "NOT_THERE, which is not a `NAME = literal` constant"),
    ({"include": ["NOPE"]}, "NOPE"),
    ({"exclude": ["NOPE"]}, "NOPE"),
    ({"space": {"MATRIX_LR": {"low": 0.1, "high": 0.01}}}, "search.space.MATRIX_LR: low (0.1) is above high (0.01)"),
    ({"space": {"DEPTH": {"low": 9, "high": 3}}}, "search.space.DEPTH: low (9) is above high (3)"),
    ({"space": {"MATRIX_LR": {"low": 0.0, "high": 0.1, "log": True}}}, "log scale needs low > 0"),
    ({"space": {"MATRIX_LR": {"lo": 0.01}}}, "unknown key(s) ['lo']"),
    ({"space": {"DEPTH": {"low": 2.5, "high": 8}}}, "must be a whole number"),
    ({"space": {"DEVICE_BATCH_SIZE": {"low": 3, "high": 64}}}, "not a power of two"),
    ({"space": {"WINDOW_PATTERN": {"low": 1, "high": 2}}}, "give choices"),
    ({"space": {"WINDOW_PATTERN": {"choices": []}}}, "non-empty list"),
    ({"space": {"ADAM_BETAS[2]": {"low": 0.1, "high": 0.2}}}, "has no element 2"),
    ({"include": ["SEED"]}, "a seed is not a hyperparameter"),
    ({"include": ["DEPTH"], "exclude": ["DEPTH"]}, "both name DEPTH"),
    ({"exclude": ["DEPTH"], "space": {"DEPTH": {"low": 1, "high": 2}}}, "which search.exclude removes"),
    ({"n_trials": 5}, "[search] has unknown key(s) n_trials"),
    ({"sampler": "cmaes"}, "search.sampler"),
    ({"changes": [3, 1]}, "search.changes"),
])
def test_a_bad_override_is_a_clear_value_error(tmp_path, settings, message):
    root = workspace(tmp_path)
    with pytest.raises(ValueError) as info:
        SearchProposer.from_settings(root, settings)
    assert message in str(info.value)
    assert not (root / ".autoresearch").exists()  # nothing is written before the settings are known good


# --- outcomes and resume ------------------------------------------------------------------------------
def test_every_outcome_reaches_the_study(tmp_path):
    root = workspace(tmp_path)
    original = (root / "train.py").read_text()
    proposer = SearchProposer.from_settings(root, {"seed": 1})
    outcomes = [ledger_trial(1, status="keep", val_bpb=1.9),
                ledger_trial(2, status="discard", val_bpb=2.1, values=[2.1, 2.3]),  # re-run: the mean counts
                ledger_trial(3, status="crash", val_bpb=None, reason="OOM: train.py exited with code 1")]
    for outcome in outcomes:
        (root / "train.py").write_text(original)
        assert proposer.propose(context(root))
        assert proposer.last_usage["seconds"] < 1.0
        proposer.tell(replace(outcome, proposer_usage=proposer.last_usage))
    trials = proposer.study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL"]
    assert [t.value for t in trials[:2]] == [pytest.approx(1.9), pytest.approx(2.2)]
    assert [t.user_attrs["ledger_ids"] for t in trials] == [[1], [2], [3]]
    assert trials[2].user_attrs["ledger_reason"].startswith("OOM")
    for t in trials:
        assert set(t.user_attrs["edits"]) <= set(t.user_attrs["point"]) and t.user_attrs["description"]
        sampled = {n.removeprefix("log2(").removesuffix(")").split("[")[0] for n in t.params}
        assert set(t.user_attrs["edits"]) - set(t.user_attrs.get("adjusted", [])) <= sampled


def test_resume_continues_the_study_and_settles_what_was_left_open(tmp_path):
    root = workspace(tmp_path)
    original = (root / "train.py").read_text()
    history: list[Trial] = []
    first = SearchProposer.from_settings(root, {"seed": 2})
    for i in (1, 2):
        d = first.propose(context(root, history))
        history.append(ledger_trial(i, d, status="discard", val_bpb=2.0 + i, usage=first.last_usage))
        first.tell(history[-1])
        (root / "train.py").write_text(original)
    # The lab dies twice: after recording trial 3 but before telling, and before trial 4 reached the ledger.
    d3 = first.propose(context(root, history))
    history.append(ledger_trial(3, d3, status="keep", val_bpb=1.5, usage=first.last_usage))
    (root / "train.py").write_text(original)
    second = SearchProposer.from_settings(root, {"seed": 2})
    d4 = second.propose(context(root, history))  # settles trial 3 from the ledger first
    assert [t.state.name for t in second.study.get_trials()] == ["COMPLETE", "COMPLETE", "COMPLETE", "RUNNING"]
    assert second.study.get_trials()[2].value == 1.5
    edit4 = (root / "train.py").read_text()
    (root / "train.py").write_text(original)

    # A third process proposes the unanswered trial again, under the same Optuna number...
    third = SearchProposer.from_settings(root, {"seed": 2})
    assert third.propose(context(root, history)) == d4
    assert (root / "train.py").read_text() == edit4
    history.append(ledger_trial(4, d4, status="crash", val_bpb=None, reason="interrupted: the lab stopped during this trial"))
    (root / "train.py").write_text(original)
    # ...once: interrupted again, it is told FAIL and a new trial is proposed.
    fourth = SearchProposer.from_settings(root, {"seed": 2})
    d5 = fourth.propose(context(root, history))
    trials = fourth.study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]  # the study grew, no number twice
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 + ["FAIL", "RUNNING"]
    assert trials[3].user_attrs["ledger_ids"] == [4] and trials[3].user_attrs["attempts"] == 2
    assert d5 and trials[4].user_attrs["attempts"] == 1
    fourth.tell(ledger_trial(5, d5, status="discard", val_bpb=2.5, usage=fourth.last_usage))
    assert fourth.study.get_trials()[4].state.name == "COMPLETE"


# --- the real loop ------------------------------------------------------------------------------------
def test_the_loop_runs_search_end_to_end(tmp_path, cpu_prepared):
    from autoresearch.lab.loop import Lab

    ws = make_workspace(tmp_path / "ws", cpu_prepared, budget=1.5, baseline_runs=1, rule="strict")
    settings = {"seed": 0, "include": ["BATCH"], "space": {"DIM": {"low": 8, "high": 64, "log": True}}}
    proposer = SearchProposer.from_settings(ws.root, settings)
    lab = Lab(ws, log=lambda msg: None)
    started = time.monotonic()
    lab.run(proposer, max_trials=3)
    candidates = [t for t in lab.ledger.trials() if t.kind == "candidate"]
    assert len(candidates) == 3, [(t.description, t.reason) for t in candidates]
    for t in candidates:
        assert set(changes(t.description)) <= {"LR", "DIM", "BATCH"}
        assert t.status in ("keep", "discard", "crash") and t.proposer == "search"
        assert t.proposer_usage["seconds"] < 1.0
    study = SearchProposer.from_settings(ws.root, settings).study  # as a restarted lab would see it
    assert [t.state.name in ("COMPLETE", "FAIL") for t in study.get_trials()] == [True] * 3
    assert [t.user_attrs["ledger_ids"] for t in study.get_trials()] == [[t.id] for t in candidates]
    assert time.monotonic() - started < 120
