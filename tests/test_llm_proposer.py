"""The LLM proposer and its search/replace edits, against fake OpenAI and Anthropic servers.

The servers (tests/llm_servers.py) are real HTTP on 127.0.0.1, so the official SDKs run for real:
their timeouts, retries on 429 with retry-after, error classes and usage fields.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoresearch.lab.ledger import Ledger, Trial
from autoresearch.lab.loop import Lab, slots_for
from autoresearch.lab.outcomes import Kind
from autoresearch.lab.outcomes import Status as TrialStatus
from autoresearch.lab.proposer import ProposalContext
from autoresearch.lab.workspace import git
from autoresearch.proposers.edits import EditError, apply_reply, describe_change, parse_reply
from autoresearch.proposers.llm import SYSTEM, LLMError, LLMProposer, model_price
from lab_helpers import TINY_TRAINER, ledger_row, make_workspace
from llm_servers import FakeAnthropic, FakeOpenAI, Sleep, Status

PROGRAM = (Path(__file__).parents[1] / "src" / "autoresearch" / "templates" / "program.md").read_text()
KEY = "sk-test-123"

GOOD = """I will raise the learning rate.

DESCRIPTION: raise LR tenfold

train.py
```python
<<<<<<< SEARCH
LR = 0.003  # Adam learning rate
=======
LR = 0.03  # Adam learning rate
>>>>>>> REPLACE
```
"""
NO_BLOCKS = "I think the learning rate is too low. DESCRIPTION: none\nLR = 0.03"
ABSENT = """DESCRIPTION: change the width
<<<<<<< SEARCH
DIM = 64  # embedding width
=======
DIM = 128  # embedding width
>>>>>>> REPLACE
"""
OTHER_FILE = """DESCRIPTION: relax the rules

program.md
<<<<<<< SEARCH
# Research protocol
=======
# Research protocol (you may edit anything)
>>>>>>> REPLACE
"""


# --- helpers ------------------------------------------------------------------------------------
@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    git(root, "init", "-q")
    (root / "train.py").write_text(TINY_TRAINER)
    (root / "program.md").write_text(PROGRAM)
    return root


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", KEY)


def make_trial(id: int, status: str = "discard", *, cost: float | None = None, proposer: str = "llm") -> Trial:
    return ledger_row(id, proposer=proposer, description="idea", status=status,
                      proposer_usage={} if cost is None else {"cost_usd": cost})


def context(root: Path, history: list[Trial] | None = None) -> ProposalContext:
    return ProposalContext(root, ["train.py"], "cpu", 2.0, "abcdef0123", 1.0, 0.01, history or [])


def proposer_for(server, root: Path, **settings) -> LLMProposer:
    api = "anthropic" if isinstance(server, FakeAnthropic) else "openai"
    model = "claude-sonnet-4-6" if api == "anthropic" else "gpt-4o"
    base = {"api": api, "model": model, "base_url": server.base_url, "api_key_env": "TEST_LLM_KEY",
            "timeout": 5, "max_retries": 2}
    return LLMProposer.from_settings(root, {**base, **settings})


# --- the edit format ----------------------------------------------------------------------------
def test_replies_are_parsed_forgivingly():
    reply = parse_reply("**Description:** halve the batch\n\n```\n### `train.py`\n<<<<<<<< search\nA\n=========\nB\n"
                        ">>>>>>>> replace\n```\nFILE: other/x.py\n<<<<<<< SEARCH\nC\n=======\n>>>>>>> REPLACE\n")
    assert reply.description == "halve the batch"
    assert [(b.path, b.search, b.replace) for b in reply.blocks] == [("train.py", "A\n", "B\n"),
                                                                     ("other/x.py", "C\n", "")]
    assert parse_reply("<<<<<<< SEARCH\nA\n=======\nB\n>>>>>>> REPLACE").blocks[0].path == "train.py"


@pytest.mark.parametrize("reply, error", [
    ("no blocks here", "no edit block"),
    ("<<<<<<< SEARCH\nA\n>>>>>>> REPLACE\n", "no the `=======` line"),
    ("<<<<<<< SEARCH\nA\n=======\nB\n", "was the reply cut off"),
    ("=======\nB\n>>>>>>> REPLACE\n", "outside any block"),
])
def test_malformed_replies_say_what_is_wrong(reply, error):
    with pytest.raises(EditError, match=error.replace("(", r"\(")):
        parse_reply(reply)


def test_edits_apply_exactly_once_or_not_at_all():
    source = "A = 1\n\ndef f():\n    x = 1   \n    return x\n\ndef g():\n    x = 1\n    return x\n"
    # Trailing whitespace and a missing final newline do not matter.
    out = apply_reply("<<<<<<< SEARCH\ndef f():\n    x = 1\n=======\ndef f():\n    x = 2\n>>>>>>> REPLACE", source)
    assert "def f():\n    x = 2\n    return x\n\ndef g():\n    x = 1\n" in out.text
    assert out.description == "edit train.py: +1 -1 lines near f" and out.ignored == []
    with pytest.raises(EditError, match="occurs 2 times"):
        apply_reply("<<<<<<< SEARCH\n    return x\n=======\n    return 1\n>>>>>>> REPLACE", source)
    with pytest.raises(EditError, match="matches 2 places"):
        apply_reply("<<<<<<< SEARCH\n    x = 1  \n    return x\n=======\n    return 1\n>>>>>>> REPLACE", source)
    with pytest.raises(EditError, match=r"(?s)not in train.py.*most similar lines.*from line 1\) are:\nA = 1"):
        apply_reply("<<<<<<< SEARCH\nA = 2\n=======\nA = 3\n>>>>>>> REPLACE", source)
    with pytest.raises(EditError, match="syntax error at line 3"):
        apply_reply("<<<<<<< SEARCH\ndef f():\n=======\ndef f(:\n>>>>>>> REPLACE", source)
    with pytest.raises(EditError, match="exactly as it was"):
        apply_reply("<<<<<<< SEARCH\nA = 1\n=======\nA = 1\n>>>>>>> REPLACE", source)
    with pytest.raises(EditError, match="only edits program.md"):
        apply_reply(OTHER_FILE, source)
    with pytest.raises(EditError, match="block 2 .*not in train.py"):  # all or nothing
        apply_reply("<<<<<<< SEARCH\nA = 1\n=======\nA = 5\n>>>>>>> REPLACE\n"
                    "<<<<<<< SEARCH\nB = 1\n=======\nB = 2\n>>>>>>> REPLACE\n", source)


def test_a_change_without_description_is_described_from_the_diff():
    assert describe_change(TINY_TRAINER, TINY_TRAINER.replace("LR = 0.003", "LR = 0.03")
                           .replace("DIM = 32", "DIM = 64")) == "LR 0.003 -> 0.03, DIM 32 -> 64"
    assert describe_change("a = 1\n", "a = 1\n") == "no change"


def test_known_models_have_prices():
    assert model_price("gpt-4o") == (2.5, 10.0) and model_price("gpt-4o-mini-2024-07-18") == (0.15, 0.6)
    assert model_price("claude-sonnet-4-20250514") == (3.0, 15.0) and model_price("anthropic/claude-opus-4-1") == (15.0, 75.0)
    assert model_price("o3-pro") is None and model_price("llama3:70b") is None


# --- against the fake servers -------------------------------------------------------------------
def test_a_good_edit_is_applied_and_its_usage_counted(repo):
    with FakeOpenAI([GOOD]) as server:
        proposer = proposer_for(server, repo)
        ctx = context(repo, [make_trial(1, "crash")])
        assert proposer.propose(ctx) == "raise LR tenfold"
    assert "LR = 0.03  # Adam" in (repo / "train.py").read_text()
    (request,) = server.requests
    assert request.headers["authorization"] == f"Bearer {KEY}"
    body = request.body
    assert body["model"] == "gpt-4o" and body["max_tokens"] == 16384 and "temperature" not in body
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"] == SYSTEM and "<<<<<<< SEARCH" in SYSTEM
    prompt = body["messages"][1]["content"]
    assert "# Research protocol" in prompt and "Best so far: commit abcdef0" in prompt
    assert TINY_TRAINER.rstrip() in prompt
    usage = proposer.last_usage
    assert (usage["requests"], usage["input_tokens"], usage["output_tokens"]) == (1, 1000, 100)
    assert usage["cost_usd"] == pytest.approx((1000 * 2.5 + 100 * 10.0) / 1e6)
    assert usage["api"] == "openai" and usage["model"] == "gpt-4o" and usage["seconds"] >= 0
    transcript = json.loads((repo / ".autoresearch/llm/00002.json").read_text())
    assert transcript["messages"][-1] == {"role": "assistant", "content": GOOD}


def test_a_malformed_reply_is_retried_with_the_error(repo):
    with FakeOpenAI([NO_BLOCKS, GOOD]) as server:
        proposer = proposer_for(server, repo)
        assert proposer.propose(context(repo)) == "raise LR tenfold"
    first, second = server.requests
    messages = second.body["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[1] == first.body["messages"][1] and messages[2]["content"] == NO_BLOCKS
    assert "could not be applied: your reply has no edit block" in messages[3]["content"]
    usage = proposer.last_usage
    assert (usage["requests"], usage["input_tokens"], usage["output_tokens"]) == (2, 2000, 200)
    assert usage["edit_errors"][0].startswith("your reply has no edit block")


def test_edits_that_never_apply_fail_the_proposal_and_leave_train_py_alone(repo):
    with FakeOpenAI([ABSENT, ABSENT]) as server:
        proposer = proposer_for(server, repo, edit_attempts=2)
        with pytest.raises(LLMError, match=r"did not apply in 2 replies; the last error: block 1 .*not in train.py"):
            proposer.propose(context(repo))
    assert "most similar lines in train.py" in server.requests[1].body["messages"][3]["content"]
    assert "DIM = 32  # embedding width" in server.requests[1].body["messages"][3]["content"]
    assert (repo / "train.py").read_text() == TINY_TRAINER
    assert proposer.last_usage["requests"] == 2 and proposer.last_usage["cost_usd"] > 0


def test_only_train_py_is_edited(repo):
    both = OTHER_FILE + "\n" + GOOD.split("DESCRIPTION: raise LR tenfold\n", 1)[1]
    with FakeOpenAI([OTHER_FILE, both]) as server:
        proposer = proposer_for(server, repo)
        assert proposer.propose(context(repo)) == "relax the rules"
    assert "only edits program.md; only train.py may be edited" in server.requests[1].body["messages"][3]["content"]
    assert (repo / "program.md").read_text() == PROGRAM
    assert "LR = 0.03" in (repo / "train.py").read_text()
    assert proposer.last_usage["ignored_files"] == ["program.md"]


def test_a_request_that_times_out_is_retried(repo):
    with FakeOpenAI([Sleep(2.0, GOOD), GOOD]) as server:
        proposer = proposer_for(server, repo, timeout=0.5)
        assert proposer.propose(context(repo)) == "raise LR tenfold"
    assert len(server.requests) == 2 and proposer.last_usage["requests"] == 1


@pytest.mark.parametrize("fake", [FakeOpenAI, FakeAnthropic])
def test_a_429_is_retried_after_the_time_it_asks(repo, fake):
    with fake([Status(429, {"retry-after": "0"}, "slow down"), GOOD]) as server:
        proposer = proposer_for(server, repo)
        assert proposer.propose(context(repo)) == "raise LR tenfold"
    assert len(server.requests) == 2


def test_the_anthropic_messages_api(repo):
    with FakeAnthropic([NO_BLOCKS, GOOD], input_tokens=2000, output_tokens=500) as server:
        proposer = proposer_for(server, repo, max_tokens=1000, temperature=0.5)
        assert proposer.propose(context(repo)) == "raise LR tenfold"
    request = server.requests[1]
    assert request.path == "/v1/messages" and "anthropic-version" in request.headers
    assert KEY in (request.headers.get("x-api-key", ""), request.headers.get("authorization", "").removeprefix("Bearer "))
    body = request.body
    assert body["model"] == "claude-sonnet-4-6" and body["max_tokens"] == 1000 and body["temperature"] == 0.5
    assert body["system"] == SYSTEM and [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    usage = proposer.last_usage
    assert (usage["input_tokens"], usage["output_tokens"]) == (4000, 1000)
    assert usage["cost_usd"] == pytest.approx((4000 * 3.0 + 1000 * 15.0) / 1e6)


def test_api_failures_end_in_a_clear_error(repo):
    with FakeOpenAI([Status(500), Status(500)]) as server:
        proposer = proposer_for(server, repo, max_retries=1)
        with pytest.raises(LLMError, match=r"openai API at .* model gpt-4o answered HTTP 500 through 2 attempt"):
            proposer.propose(context(repo))
    assert len(server.requests) == 2 and proposer.last_usage["requests"] == 0
    with FakeAnthropic([Status(401, message="invalid x-api-key")]) as server:
        proposer = proposer_for(server, repo)
        with pytest.raises(LLMError, match=r"refused the key from \$TEST_LLM_KEY \(HTTP 401\).*invalid x-api-key"):
            proposer.propose(context(repo))


def test_the_spend_cap_stops_the_proposer(repo):
    spent = [make_trial(1, cost=0.6), make_trial(2, cost=0.5), make_trial(3, cost=9.0, proposer="agent")]
    with FakeOpenAI([GOOD, NO_BLOCKS]) as server:
        capped = proposer_for(server, repo, max_cost=1.0)
        assert capped.propose(context(repo, spent)) is None
        assert "spend cap" in capped.stop_reason and "$1.1000 of max_cost $1.00" in capped.stop_reason
        assert server.requests == []
        assert proposer_for(server, repo, max_cost=2.0).propose(context(repo, spent)) == "raise LR tenfold"
        # A proposal stops retrying once its own replies reach the cap.
        nearly = proposer_for(server, repo, max_cost=1.102)
        with pytest.raises(LLMError, match="spend cap .* was reached while retrying"):
            nearly.propose(context(repo, spent))
    assert len(server.requests) == 2


def test_settings_are_checked_when_the_proposer_is_made(repo, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        LLMProposer.from_settings(repo, {"model": "gpt-4o"})
    with pytest.raises(ValueError, match="price_per_mtok_in"):
        LLMProposer.from_settings(repo, {"model": "llama3", "base_url": "http://127.0.0.1:1/v1", "max_cost": 5})
    with pytest.raises(ValueError, match="api must be one of"):
        LLMProposer.from_settings(repo, {"api": "gemini", "model": "x", "api_key_env": "TEST_LLM_KEY"})
    local = LLMProposer.from_settings(repo, {"model": "llama3", "base_url": "http://127.0.0.1:1/v1",
                                             "price_per_mtok_in": 0, "price_per_mtok_out": 0, "max_cost": 5})
    assert local.api_key == "none" and local.cost({"input_tokens": 10**6, "output_tokens": 10**6}) == 0
    assert LLMProposer.from_settings(repo, {"model": "gpt-4o", "api_key_env": "TEST_LLM_KEY"}).max_tokens_param \
        == "max_completion_tokens"  # OpenAI's own API


# --- the loop, end to end -----------------------------------------------------------------------
def test_the_loop_records_usage_goes_on_past_a_failed_proposal_and_honours_the_cap(tmp_path, cpu_prepared):
    ws = make_workspace(tmp_path / "ws", cpu_prepared, baseline_runs=1, rule="strict")
    settings = {"edit_attempts": 2}
    with FakeOpenAI([NO_BLOCKS, ABSENT, GOOD]) as server:
        lab = Lab(ws, log=lambda msg: None)
        try:
            lab.run(proposer_for(server, ws.root, **settings), max_trials=2)
            # A restarted run with a cap below what was spent stops at once, asking nothing.
            lab.run(proposer_for(server, ws.root, max_cost=0.01, **settings), max_trials=5)
        finally:
            lab.close()
    assert len(server.requests) == 3
    trials = Ledger(ws.ledger_path).trials()
    candidates = [t for t in trials if t.kind == Kind.CANDIDATE]
    assert [t.status for t in candidates] == [TrialStatus.CRASH, TrialStatus.KEEP], [t.reason for t in trials]
    failed, good = candidates
    assert failed.description == "proposal failed: LLMError" and failed.proposer == "llm"
    assert failed.reason.startswith("proposer error: the model's edits did not apply in 2 replies")
    assert failed.proposer_usage["requests"] == 2 and failed.proposer_usage["cost_usd"] == pytest.approx(0.007)
    assert good.description == "raise LR tenfold" and good.val_bpb < trials[0].val_bpb
    assert good.proposer_usage["requests"] == 1 and good.proposer_usage["input_tokens"] == 1000
    assert "LR = 0.03" in good.diff
    # The second proposal was told about the first one's failure.
    assert "proposer error: the model's edits did not apply" in server.requests[2].body["messages"][1]["content"]


def test_with_two_trial_slots_the_proposals_are_asked_at_once(tmp_path, cpu_prepared):
    wider = (GOOD.replace("raise LR tenfold", "widen the model")
             .replace("LR = 0.003  # Adam learning rate", "DIM = 32  # embedding width")
             .replace("LR = 0.03  # Adam learning rate", "DIM = 48  # embedding width"))
    ws = make_workspace(tmp_path / "ws", cpu_prepared, baseline_runs=1, rule="strict")
    with FakeOpenAI([Sleep(1.5, GOOD), Sleep(1.5, wider)]) as server:
        lab = Lab(ws, log=lambda msg: None, slots=slots_for(2))
        try:
            lab.run(proposer_for(server, ws.root), max_trials=2)
        finally:
            lab.close()
    first, second = server.requests
    assert second.at - first.at < 1.0  # the second was asked while the first was still being answered
    candidates = [t for t in Ledger(ws.ledger_path).trials() if t.kind == Kind.CANDIDATE and not
                  t.decision.get("reapplied_from")]
    assert sorted(t.description for t in candidates) == ["raise LR tenfold", "widen the model"]
    for t in candidates:  # each proposal's conversation is kept with its own trial
        notes = ws.root / t.proposer_usage["notes"]
        assert notes == ws.lab_dir / "proposals" / f"{t.id:05d}"
        assert json.loads((notes / "transcript.json").read_text())["usage"]["requests"] == 1
