"""The trusted scorer (harness.scoring) and the model's side of it (harness.model_server).

The metric first: bits per byte over the targets that carry bytes, each row and target counted once,
whatever the batch size, order or probes. Then the model it scores is assumed hostile: every way of
reading ahead, remembering, looking at batch-mates or making up answers below is a real torch model
(or a real LocalModel whose answering was patched, as a train.py could patch it inside the model
server), and each must void the measurement (ModelMisbehaved). Rows here are small (vocabulary 64,
24 positions) so that every check runs in milliseconds on a CPU.
"""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import autoresearch
from autoresearch.harness import HarnessError, model_server, wire
from autoresearch.harness.loader import eval_rows
from autoresearch.harness.model_server import LocalModel
from autoresearch.harness.scoring import (ALL_PROBED_UNDER, TOLERANCE, ModelMisbehaved, RemoteModel, Scorer,
                                          eval_batch_size)

V, T = 64, 24  # vocabulary and positions of the synthetic rows
BOS = 63
SPECIAL = 60  # tokens 60 to 63 are special: they carry no bytes
CPU = torch.device("cpu")
TOL = TOLERANCE["cpu"]


def synthetic_token_bytes() -> np.ndarray:
    counts = np.random.default_rng(0).integers(1, 5, size=V)
    counts[SPECIAL:] = 0
    return counts


def synthetic_rows(n: int, seed: int = 0) -> np.ndarray:
    """n rows of T + 1 tokens: BOS, then tokens some of which are special (targets without bytes)."""
    rows = np.random.default_rng(seed).integers(0, SPECIAL + 2, size=(n, T + 1))
    rows[:, 0] = BOS
    return rows


def bpb(model, rows=None, token_bytes=None, batch_size: int = 8, probes: int | None = None, seed: int = 0,
        fresh_model=None) -> float:
    rows = synthetic_rows(40) if rows is None else rows
    token_bytes = synthetic_token_bytes() if token_bytes is None else token_bytes
    scorer = Scorer(rows, token_bytes, batch_size, TOL, probes=probes, seed=seed)
    return scorer.score(model, fresh_model=fresh_model).bpb


def local(module: torch.nn.Module, vocab: int = V) -> LocalModel:
    return LocalModel(module, CPU, vocab)


# --- honest models ----------------------------------------------------------------------------------
class CausalLM(torch.nn.Module):
    """A small honest model: each position sees its own token and the mean of those before it."""

    def __init__(self, vocab: int = V, width: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(2 * width, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.embed(inputs)
        seen = x.cumsum(1) / torch.arange(1, inputs.shape[1] + 1).view(1, -1, 1)
        return 3 * self.head(torch.tanh(self.mix(torch.cat([x, seen], dim=-1))))


class FixedDistribution(torch.nn.Module):
    """The same next-token distribution at every position, whatever the context."""

    def __init__(self, probabilities: list[float]):
        super().__init__()
        self.register_buffer("logits", torch.tensor(probabilities).log())

    def forward(self, inputs):
        return self.logits.expand(*inputs.shape, len(self.logits))


# --- the metric ---------------------------------------------------------------------------------------
# Vocabulary of 4: tokens 0 and 1 carry 1 and 2 bytes, 2 and 3 none (3 is BOS). At every position the
# model says 0 with probability 1/2 (1 bit), 1 with 1/4 (2 bits), 2 and 3 with 1/8 (3 bits each).
HAND_ROWS = np.array([[3, 0, 1, 2], [3, 2, 2, 0]])
HAND_BYTES = np.array([1, 2, 0, 0])
HAND_MODEL = FixedDistribution([0.5, 0.25, 0.125, 0.125])


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_bits_per_byte_by_hand_targets_without_bytes_left_out(batch_size):
    # Counted targets: 0 (1 bit, 1 byte) and 1 (2 bits, 2 bytes) in the first row, 0 (1 bit, 1 byte) in
    # the second; the three targets 2 carry no bytes. 4 bits over 4 bytes.
    score = Scorer(HAND_ROWS, HAND_BYTES, batch_size, TOL, seed=1).score(local(HAND_MODEL, 4))
    assert score.bpb == pytest.approx(1.0, rel=1e-6)
    assert score.nats == pytest.approx(4 * math.log(2), rel=1e-6)
    assert (score.bytes, score.rows, score.probes) == (4, 2, 2)  # both rows probed, copies not counted


def test_bits_per_byte_by_hand_with_a_uniform_model():
    uniform = FixedDistribution([0.25] * 4)  # 2 bits a target; 3 counted targets over 4 bytes
    assert bpb(local(uniform, 4), HAND_ROWS, HAND_BYTES, batch_size=3) == pytest.approx(1.5, rel=1e-6)


def test_every_row_counts_once_however_often_it_is_sent():
    rows = np.repeat(HAND_ROWS, [3, 1], axis=0)  # the first row three times is three rows
    score = Scorer(rows, HAND_BYTES, 2, TOL, seed=0).score(local(HAND_MODEL, 4))
    assert (score.bytes, score.rows) == (3 * 3 + 1, 4)
    assert score.nats == pytest.approx((3 * 3 + 1) * math.log(2), rel=1e-6)


@pytest.fixture(scope="module")
def real_rows(small_prepared, tiny_profile):
    """The fixed validation rows of the small corpus: 32 rows of 65 tokens, vocabulary 512."""
    return eval_rows(small_prepared.tokens("val"), small_prepared.doc_starts("val"), tiny_profile.seq_len,
                     small_prepared.tokenizer.bos_id, tiny_profile.eval_rows)


def test_on_a_real_model_the_score_is_the_definition(small_prepared, real_rows):
    token_bytes = small_prepared.tokenizer.token_bytes()
    model = CausalLM(vocab=512, width=32)
    with torch.no_grad():
        logits = model(torch.from_numpy(real_rows[:, :-1])).double()
    targets = torch.from_numpy(real_rows[:, 1:])
    weights = torch.from_numpy(token_bytes.astype(np.int64))[targets]
    losses = F.cross_entropy(logits.reshape(-1, 512), targets.reshape(-1), reduction="none")
    counted = weights.reshape(-1) > 0
    assert 0 < int(counted.sum()) < counted.numel()  # the real rows hold targets without bytes (BOS)
    definition = float(losses[counted].sum()) / (math.log(2) * int(weights.sum()))
    score = Scorer(real_rows, token_bytes, 8, TOL).score(local(model, 512))
    assert score.bpb == pytest.approx(definition, rel=1e-6)
    assert score.bytes == int(weights.sum()) and score.worst_difference <= TOL


def test_an_honest_score_depends_on_neither_batch_size_nor_seed(small_prepared, real_rows):
    token_bytes, model = small_prepared.tokenizer.token_bytes(), local(CausalLM(vocab=512, width=32), 512)
    scores = [Scorer(real_rows, token_bytes, batch_size, TOL, probes=probes, seed=seed).score(model).bpb
              for batch_size in (1, 5, 32) for seed in (0, 1, 2) for probes in (None, 0, 7)]
    assert max(scores) - min(scores) <= 1e-7 * min(scores)


def test_the_model_is_shown_inputs_only_in_eval_mode_without_gradients():
    class Recording(CausalLM):
        def forward(self, inputs):
            calls.append((inputs.clone(), self.training, torch.is_grad_enabled()))
            return super().forward(inputs)

    calls = []
    rows = synthetic_rows(10)
    module = Recording().train()  # as a trainer would hand it over
    Scorer(rows, synthetic_token_bytes(), 4, TOL, probes=3, seed=0).score(local(module))
    assert len(calls) == 3 + 1  # 10 rows in batches of 4, then 3 copies in one batch
    for inputs, training, grad in calls:
        assert inputs.shape == (4, T)  # every batch padded to the full size: one shape to compute
        assert not training and not grad
    scored = torch.cat([inputs for inputs, _, _ in calls[:3]])
    assert {tuple(row) for row in scored.tolist()} == {tuple(row) for row in rows[:, :-1].tolist()}  # no targets


def test_rows_without_bytes_are_refused_before_the_model_is_asked():
    class Untouchable(CausalLM):
        def forward(self, inputs):
            raise AssertionError("the model was asked")

    with pytest.raises(HarnessError, match="hold no bytes to score"):
        bpb(local(Untouchable()), token_bytes=np.zeros(V, dtype=np.int64))


@pytest.mark.parametrize("forward, message", [
    (lambda self, x: torch.zeros(*x.shape, V + 1), "needs logits of shape \\(batch, seq_len, 64\\)"),
    (lambda self, x: torch.zeros(*x.shape, V).sum(), "must return logits, not a loss"),
    (lambda self, x: (torch.zeros(*x.shape, V), torch.tensor(0.0)), "returned tuple"),
    (lambda self, x: torch.zeros(*x.shape, V).index_fill(1, torch.tensor([3]), float("nan")), "not finite"),
    (lambda self, x: torch.zeros(*x.shape, V).index_fill(2, torch.tensor([7]), float("inf")), "not finite"),
], ids=["wrong-shape", "a-loss", "a-tuple", "nan", "inf"])
def test_a_model_that_does_not_return_finite_logits_is_told_so(forward, message):
    broken = type("Broken", (torch.nn.Module,), {"forward": forward})()
    with pytest.raises(HarnessError, match=message):
        bpb(local(broken))


def test_the_default_batch_fits_the_logits_budget():
    assert eval_batch_size("cpu", 256, 2048) == 128  # 2 MiB of logits a row, 256 MiB a batch
    assert eval_batch_size("cuda", 2048, 8192) == 32  # 64 MiB a row, 2 GiB a batch
    assert eval_batch_size("cpu", 256, 3000) == 64  # a power of two, within the budget
    assert eval_batch_size("cpu", 2048, 2**20) == 1  # never less than one row


# --- hostile models: each must void the measurement -------------------------------------------------
def caught(model, fresh_model=None, **kwargs) -> str:
    with pytest.raises(ModelMisbehaved) as failure:
        bpb(model, fresh_model=fresh_model, **kwargs)
    return str(failure.value)


class PeeksAtTheNextToken(CausalLM):
    """(1) Puts its mass on the token it is to predict, read from the inputs."""

    def forward(self, inputs):
        ahead = torch.cat([inputs[:, 1:], inputs[:, -1:]], dim=1)
        return super().forward(inputs) + 8 * F.one_hot(ahead, V)


class PeeksSometimes(CausalLM):
    """(2) Reads the next token at one position in eight (t = 3, 11, 19)."""

    def forward(self, inputs):
        ahead = torch.cat([inputs[:, 1:], inputs[:, -1:]], dim=1)
        sometimes = (torch.arange(inputs.shape[1]) % 8 == 3).view(1, -1, 1)
        return super().forward(inputs) + 8 * F.one_hot(ahead, V) * sometimes


class PeeksFurtherAhead(CausalLM):
    """(2) Never the next token, but the one three positions on."""

    def forward(self, inputs):
        further = torch.cat([inputs[:, 3:], inputs[:, -3:]], dim=1)
        return super().forward(inputs) + 0.5 * self.head(self.embed(further))


class RemembersRows(CausalLM):
    """(3) Keeps every row it is shown, and boosts the token it saw after the same prefix."""

    def __init__(self):
        super().__init__()
        self.after: dict[bytes, int] = {}

    def forward(self, inputs):
        boost = torch.zeros(*inputs.shape, V)
        for b, row in enumerate(inputs.numpy()):
            for t in range(len(row)):
                if (seen := self.after.get(row[:t + 1].tobytes())) is not None:
                    boost[b, t, seen] = 5.0
            for t in range(len(row) - 1):
                self.after[row[:t + 1].tobytes()] = int(row[t + 1])
        return super().forward(inputs) + boost


class MixesInItsBatchMates(CausalLM):
    """(4) Each row's logits lean towards the batch's mean."""

    def forward(self, inputs):
        logits = super().forward(inputs)
        return logits + 0.5 * logits.mean(dim=0, keepdim=True)


class ClaimsCertainty(LocalModel):
    """(5) A patched answer: the next-token logit is the log-sum-exp (probability 1); vectors honest."""

    def answer(self, rows):
        lse, _ = super().answer(rows)
        return lse, lse.copy()


class FabricatesVectors(LocalModel):
    """(6) Patched answers and vectors, consistent with each other: the next token (which the model
    server is sent with the row) gets 8 nats more, the log-sum-exp of every position is kept."""

    def answer(self, rows):
        super().answer(rows)
        targets = torch.from_numpy(np.ascontiguousarray(rows[:, 1:], dtype=np.int64))
        boosted = self.last + 8 * F.one_hot(targets, self.vocab_size)
        self.last = boosted - (boosted.logsumexp(-1) - self.last.logsumexp(-1)).unsqueeze(-1)
        return self.answers(targets)

    def answers(self, targets):
        return (self.last.logsumexp(-1).numpy(), self.last.gather(-1, targets.unsqueeze(-1)).squeeze(-1).numpy())


class ReplaysWhatItAnswered(FabricatesVectors):
    """(6), and it remembers: a prefix it answered before gets the same vector again, so a probe's copy
    (the row's tokens up to the cut) is answered exactly as the row was."""

    def __init__(self, *args):
        super().__init__(*args)
        self.answered: dict[bytes, torch.Tensor] = {}

    def answer(self, rows):
        super().answer(rows)
        for b, row in enumerate(rows):
            for t in range(rows.shape[1] - 1):
                key = row[:t + 1].tobytes()
                if key in self.answered:
                    self.last[b, t] = self.answered[key]
                else:
                    self.answered[key] = self.last[b, t].clone()
        return self.answers(torch.from_numpy(np.ascontiguousarray(rows[:, 1:], dtype=np.int64)))


class ClaimsMoreThanCertainty(LocalModel):
    """A patched answer at one position of each batch: a next-token logit far above the log-sum-exp,
    a probability above 1 that makes that target's loss hugely negative."""

    def answer(self, rows):
        lse, z = super().answer(rows)
        z = z.copy()
        z[0, 5] = lse[0, 5] + 1e6
        return lse, z


def test_1_peeking_at_the_next_token_is_caught():
    assert "reads tokens ahead" in caught(local(PeeksAtTheNextToken()))


def test_2_peeking_at_one_position_in_eight_is_caught_by_the_default_probes():
    # A probe tests the one position before its cut, so a cheat at a fraction f of positions escapes P
    # probes with probability (1 - f)^P. The default probes every row of an evaluation up to
    # ALL_PROBED_UNDER = 512 rows and at least that many beyond: f = 1/8 escapes the 128 probes of 128
    # rows with probability 4e-8; f = 2.7% escapes 512 probes, f = 1.1% the h100 profile's 1280, with 1e-6.
    rows = synthetic_rows(128)
    assert Scorer(rows, synthetic_token_bytes(), 16, TOL).n_probes == 128
    assert Scorer(synthetic_rows(10240), synthetic_token_bytes(), 16, TOL).n_probes == 1280
    assert Scorer(synthetic_rows(1000), synthetic_token_bytes(), 16, TOL).n_probes == ALL_PROBED_UNDER
    for seed in range(20):
        caught(local(PeeksSometimes()), rows=rows, batch_size=16, seed=seed)


def test_2_peeking_a_few_positions_ahead_is_caught():
    caught(local(PeeksFurtherAhead()))


def test_3_a_model_that_remembers_rows_it_was_shown_is_caught():
    assert "rows it was shown before" in caught(local(RemembersRows()))


def test_4_a_model_that_looks_at_its_batch_mates_is_caught():
    assert "batch-mates" in caught(local(MixesInItsBatchMates()))


def test_5_answers_that_claim_certainty_are_caught_by_the_audits():
    assert "its answers are not its logits" in caught(ClaimsCertainty(CausalLM(), CPU, V))


def test_6_fabricated_consistent_vectors_are_caught_by_the_probes_vector_comparison():
    assert "reads tokens ahead" in caught(FabricatesVectors(CausalLM(), CPU, V))


def test_a_probability_above_one_at_a_single_position_is_caught_wherever_it_is():
    # No probe and two random audits a batch: the audits alone would almost never look there.
    assert "a probability above 1" in caught(ClaimsMoreThanCertainty(CausalLM(), CPU, V), probes=0)


def test_a_model_replaying_its_answers_gets_through_one_process_and_is_caught_by_a_fresh_one():
    # No check inside one process can tell a copy answered from memory from one answered honestly:
    # the lab must give the copies to a second process that was shown nothing (fresh_model).
    honest = bpb(local(CausalLM()))
    cheated = bpb(ReplaysWhatItAnswered(CausalLM(), CPU, V))
    assert cheated < honest - 1.0
    assert "reads tokens ahead" in caught(ReplaysWhatItAnswered(CausalLM(), CPU, V),
                                          fresh_model=ReplaysWhatItAnswered(CausalLM(), CPU, V))


def test_a_fresh_model_leaves_an_honest_score_as_it_is():
    assert bpb(local(CausalLM()), fresh_model=local(CausalLM())) == pytest.approx(bpb(local(CausalLM())), rel=1e-9)


def test_a_lean_below_the_tolerance_passes_and_gains_at_most_the_tolerance_a_target():
    class LeansAhead(FabricatesVectors):
        def answer(self, rows):
            LocalModel.answer(self, rows)
            targets = torch.from_numpy(np.ascontiguousarray(rows[:, 1:], dtype=np.int64))
            self.last = self.last + 0.5 * TOL * F.one_hot(targets, V)
            return self.answers(targets)

    rows, token_bytes = synthetic_rows(40), synthetic_token_bytes()
    targets_with_bytes = int((token_bytes[rows[:, 1:]] > 0).sum())
    bound = TOL * targets_with_bytes / (math.log(2) * int(token_bytes[rows[:, 1:]].sum()))
    gain = bpb(local(CausalLM()), rows) - bpb(LeansAhead(CausalLM(), CPU, V), rows)
    assert 0 < gain <= bound


class WrongShapes(LocalModel):
    def __init__(self, how: str):
        super().__init__(CausalLM(), CPU, V)
        self.how = how

    def answer(self, rows):
        lse, z = super().answer(rows)
        return {"short": (lse[:, :-1], z[:, :-1]), "flat": (lse.ravel(), z.ravel()), "one-array": np.stack([lse, z]),
                "lists": (lse.tolist(), z.tolist())}.get(self.how, (lse, z))

    def vectors(self, picks):
        vectors = super().vectors(picks)
        return {"narrow-vectors": vectors[:, :-1], "words": np.full(vectors.shape, "logit", dtype=object)}.get(
            self.how, vectors)


@pytest.mark.parametrize("how", ["short", "flat", "one-array", "lists", "narrow-vectors", "words"])
def test_7_answers_of_the_wrong_shape_are_caught(how):
    with pytest.raises(ModelMisbehaved):
        bpb(WrongShapes(how))


# --- the model in another process -------------------------------------------------------------------
@pytest.fixture
def served():
    """`served(model)`: a RemoteModel talking to model_server.serve(model) in a thread, over a socket."""
    sockets = []

    def start(model: LocalModel, seq_len: int = T, vocab: int = V) -> RemoteModel:
        ours, theirs = socket.socketpair()
        ours.settimeout(10)
        sockets.extend([ours, theirs])
        threading.Thread(target=model_server.serve, args=(theirs, model, seq_len), daemon=True).start()
        return RemoteModel(ours, seq_len, vocab)

    yield start
    for sock in sockets:
        sock.close()


def test_a_remote_model_answers_exactly_what_the_local_model_answers(served):
    remote, here = served(local(CausalLM())), local(CausalLM())
    rows = synthetic_rows(6)
    for got, want in zip(remote.answer(rows), here.answer(rows)):
        assert np.array_equal(got, want)
    picks = [(0, 0), (5, T - 1), (2, 7)]
    assert np.array_equal(remote.vectors(picks), here.vectors(picks))
    assert bpb(served(local(CausalLM())), seed=3) == bpb(local(CausalLM()), seed=3)


def test_a_remote_cheat_is_caught_as_a_local_one_is(served):
    caught(served(FabricatesVectors(CausalLM(), CPU, V)))


def fake_server(reply) -> RemoteModel:
    """A RemoteModel whose server answers every request with `reply(sock, message)`."""
    ours, theirs = socket.socketpair()
    ours.settimeout(10)

    def serve():
        try:
            while (message := wire.receive(theirs)) is not None:
                reply(theirs, message)
        except OSError:  # the reply hung up
            pass
        theirs.close()

    threading.Thread(target=serve, daemon=True).start()
    return RemoteModel(ours, T, V)


def test_a_server_sending_too_few_bytes_misbehaved():
    remote = fake_server(lambda sock, m: wire.send(sock, wire.Kind.SCORES, b"\0" * 100))
    with pytest.raises(ModelMisbehaved, match="answered 100 bytes"):
        remote.answer(synthetic_rows(2))


def test_a_server_answering_with_the_wrong_kind_misbehaved():
    remote = fake_server(lambda sock, m: wire.send(sock, wire.Kind.VECTORS, b"\0" * (2 * 2 * T * 4)))
    with pytest.raises(ModelMisbehaved, match="VECTORS|vectors"):
        remote.answer(synthetic_rows(2))


def test_a_server_announcing_more_bytes_than_due_is_refused_before_they_are_read():
    def announce(sock, message):
        header = wire.json.dumps({"kind": "scores", "size": 1 << 40}).encode()
        sock.sendall(wire.struct.pack("<I", len(header)) + header)  # and never the terabyte

    with pytest.raises(wire.WireError, match="at most 384 here"):
        fake_server(announce).answer(synthetic_rows(2))


def test_a_server_that_fails_or_ends_says_so():
    failing = fake_server(lambda sock, m: wire.send(sock, wire.Kind.ERROR, message="CUDA error: out of memory"))
    with pytest.raises(HarnessError, match="failed while it was being scored: CUDA error: out of memory"):
        failing.answer(synthetic_rows(2))
    ending = fake_server(lambda sock, m: sock.close())
    with pytest.raises((HarnessError, OSError)):
        ending.answer(synthetic_rows(2))


def test_the_model_server_command_rebuilds_the_model_from_train_py_and_answers(tmp_path, small_prepared, real_rows):
    from lab_helpers import TINY_TRAINER, load_script

    trainer = tmp_path / "train.py"
    trainer.write_text(TINY_TRAINER)
    config = {"vocab_size": 512, "dim": 32}
    torch.manual_seed(0)
    built = load_script(trainer, "tiny_trainer_for_scoring").build_model(config)
    torch.save({"config": config, "state_dict": built.state_dict(), "profile": "tiny"}, tmp_path / "checkpoint.pt")
    with listening() as (server, path):
        proc = model_server_command(trainer, tmp_path, path)
        conn, _ = server.accept()
        conn.settimeout(60)
        assert wire.receive(conn).kind == wire.Kind.HELLO
        wire.send(conn, wire.Kind.LOAD, checkpoint=str(tmp_path / "checkpoint.pt"))
        ready = wire.receive(conn)
        assert (ready.kind, ready.fields) == (wire.Kind.READY, {"params": 2 * 512 * 32})
        token_bytes = small_prepared.tokenizer.token_bytes()
        remote = Scorer(real_rows, token_bytes, 8, TOL, seed=5).score(RemoteModel(conn, 64, 512))
        conn.close()
        assert proc.wait(timeout=60) == 0, proc.stdout.read().decode()
    rebuilt = model_server.load_model(trainer, tmp_path / "checkpoint.pt", CPU)
    here = Scorer(real_rows, token_bytes, 8, TOL, seed=5).score(local(rebuilt, 512))
    # Two processes may sum in float32 in a different order (their thread counts differ under load).
    assert remote.bpb == pytest.approx(here.bpb, rel=1e-5)


def test_the_model_server_runs_no_code_of_train_py_before_it_is_told_to_load(tmp_path):
    # The lab starts it while the trainer runs; train.py's code must not run beside the trainer's.
    trainer = tmp_path / "train.py"
    trainer.write_text("import pathlib\npathlib.Path(__file__).with_name('imported').write_text('yes')\n")
    with listening() as (server, path):
        proc = model_server_command(trainer, tmp_path, path)
        conn, _ = server.accept()
        conn.settimeout(60)
        hello = wire.receive(conn)
        assert (hello.kind, hello.fields) == (wire.Kind.HELLO, {"key": "k"})
        time.sleep(0.5)
        assert not (tmp_path / "imported").exists()
        conn.close()  # the trial ended before a checkpoint came: it leaves quietly
        assert proc.wait(timeout=60) == 0
    assert not (tmp_path / "imported").exists()


def test_the_model_server_command_says_when_train_py_has_no_build_model(tmp_path):
    trainer = tmp_path / "train.py"
    trainer.write_text("x = 1\n")
    torch.save({"config": {}, "state_dict": {}}, tmp_path / "checkpoint.pt")
    with listening() as (server, path):
        proc = model_server_command(trainer, tmp_path, path)
        conn, _ = server.accept()
        conn.settimeout(60)
        assert wire.receive(conn).kind == wire.Kind.HELLO
        wire.send(conn, wire.Kind.LOAD, checkpoint=str(tmp_path / "checkpoint.pt"))
        failure = wire.receive(conn)
        assert failure.kind is wire.Kind.ERROR and "defines no build_model(config)" in failure.fields["message"]
        assert proc.wait(timeout=60) == 1


def model_server_command(trainer: Path, cwd: Path, socket_path: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autoresearch.harness.model_server", str(trainer), "cpu", "64", "512"],
                            cwd=cwd, env=server_env(socket_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


class listening:
    """A Unix socket listening at a short path (theirs are limited to about 100 bytes)."""

    def __enter__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="ar-score-"))
        self.path = str(self.folder / "lab.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(1)
        self.server.settimeout(60)
        return self.server, self.path

    def __exit__(self, *exc):
        self.server.close()
        os.unlink(self.path)
        self.folder.rmdir()


def server_env(path: str) -> dict:
    src = str(Path(autoresearch.__file__).resolve().parents[1])
    return {**os.environ, wire.SOCKET_ENV: path, wire.KEY_ENV: "k",
            "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
