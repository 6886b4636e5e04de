"""evaluate_bpb: validation bits per byte, scored by the harness from the logits the model returns."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from autoresearch.harness import HarnessError, evaluate_bpb

# A four-token vocabulary for hand computation: token 0 is special (0 bytes), 1-3 stand for 1-3 bytes.
TOKEN_BYTES = torch.tensor([0, 1, 2, 3])
PROBS = torch.tensor([1 / 2, 1 / 4, 1 / 8, 1 / 8])  # -log2 p: 1, 2, 3 and 3 bits


class FixedLogits(torch.nn.Module):
    """Predicts PROBS at every position, whatever the input."""

    def forward(self, inputs):
        return PROBS.log().expand(*inputs.shape, len(PROBS))


class TinyLM(torch.nn.Module):
    """A real (if tiny) causal language model: embeddings, a running mean over the prefix, a head."""

    def __init__(self, vocab: int, width: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.dropout = torch.nn.Dropout(0.5)  # would change the result if the model were left training
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, inputs):
        x = self.embed(inputs)
        prefix_mean = x.cumsum(dim=1) / torch.arange(1, inputs.shape[1] + 1).view(1, -1, 1)
        return self.head(self.dropout(torch.relu(self.mix(prefix_mean))))


class Recorder(torch.nn.Module):
    """Wraps a model and records how it is called."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, *args, **kwargs):
        self.calls.append({"args": args, "kwargs": kwargs, "training": self.training,
                           "grad": torch.is_grad_enabled()})
        return self.model(*args)


def random_rows(n=7, seq_len=16, vocab=50, seed=0):
    return torch.randint(0, vocab, (n, seq_len + 1), generator=torch.Generator().manual_seed(seed))


def test_bits_per_byte_of_a_hand_computed_case():
    rows = torch.tensor([[0, 1, 2, 3, 1]])  # targets 1, 2, 3, 1: 2 + 3 + 3 + 2 bits over 1 + 2 + 3 + 1 bytes
    assert evaluate_bpb(FixedLogits(), rows, TOKEN_BYTES, batch_size=1, device="cpu") == pytest.approx(10 / 7, rel=1e-6)


def test_targets_without_bytes_are_left_out():
    rows = torch.tensor([[1, 0, 2, 3, 1]])  # target 0 (special) carries 1 bit but no bytes: not counted
    assert evaluate_bpb(FixedLogits(), rows, TOKEN_BYTES, batch_size=1, device="cpu") == pytest.approx(8 / 6, rel=1e-6)


def test_every_row_and_target_counts_once():
    rows = torch.tensor([[0, 1, 2, 3, 1], [0, 3, 3, 0, 0]])  # second row: 3 + 3 bits over 3 + 3 bytes
    bpb = evaluate_bpb(FixedLogits(), rows, TOKEN_BYTES, batch_size=1, device="cpu")
    assert bpb == pytest.approx((10 + 6) / (7 + 6), rel=1e-6)


def test_the_result_equals_the_definition_on_a_real_model():
    vocab = 50
    model, rows = TinyLM(vocab).eval(), random_rows(vocab=vocab)
    token_bytes = torch.randint(1, 5, (vocab,), generator=torch.Generator().manual_seed(1))
    token_bytes[:3] = 0  # three special tokens
    targets = rows[:, 1:].reshape(-1)
    with torch.no_grad():
        nats = F.cross_entropy(model(rows[:, :-1]).reshape(-1, vocab).double(), targets, reduction="none")
    counted = token_bytes[targets] > 0
    expected = nats[counted].sum().item() / (math.log(2) * token_bytes[targets][counted].sum().item())
    assert evaluate_bpb(model, rows, token_bytes, batch_size=4, device="cpu") == pytest.approx(expected, rel=1e-6)


def test_the_result_does_not_depend_on_the_batch_size():
    vocab = 50
    model, rows = TinyLM(vocab), random_rows(n=7, vocab=vocab)
    token_bytes = torch.ones(vocab, dtype=torch.int64)
    token_bytes[0] = 0
    results = [evaluate_bpb(model, rows, token_bytes, batch_size=b, device="cpu") for b in (1, 3, 7, 100)]
    assert results == pytest.approx([results[0]] * 4, rel=1e-9)


def test_the_model_is_given_inputs_only_in_eval_mode_without_gradients():
    rows = random_rows(n=5, vocab=4)
    model = Recorder(FixedLogits())
    evaluate_bpb(model, rows, TOKEN_BYTES, batch_size=2, device="cpu")
    assert [len(c["args"][0]) for c in model.calls] == [2, 2, 1]
    for i, call in enumerate(model.calls):
        assert call["kwargs"] == {} and len(call["args"]) == 1  # no targets, no flags
        assert torch.equal(call["args"][0], rows[2 * i : 2 * i + 2, :-1])
        assert call["args"][0].dtype == torch.int64
        assert call["training"] is False
        assert call["grad"] is False


@pytest.mark.parametrize("mode", [True, False], ids=["training", "eval"])
def test_the_models_mode_is_restored(mode):
    model = TinyLM(50).train(mode)
    evaluate_bpb(model, random_rows(), torch.ones(50, dtype=torch.int64), batch_size=3, device="cpu")
    assert model.training is mode
    assert all(m.training is mode for m in model.modules())


class ReturnsLoss(torch.nn.Module):
    def forward(self, inputs):
        return FixedLogits()(inputs).mean()


class ReturnsLogitsAndLoss(torch.nn.Module):
    def forward(self, inputs):
        logits = FixedLogits()(inputs)
        return logits, logits.mean()


class ReturnsWrongVocab(torch.nn.Module):
    def forward(self, inputs):
        return torch.zeros(*inputs.shape, len(TOKEN_BYTES) + 1)


@pytest.mark.parametrize("model", [ReturnsLoss(), ReturnsLogitsAndLoss(), ReturnsWrongVocab()],
                         ids=["scalar-loss", "tuple", "wrong-vocab"])
def test_a_model_that_does_not_return_logits_is_told_so(model):
    model.train()
    with pytest.raises(HarnessError, match=r"logits of shape \(batch, seq_len, 4\)") as excinfo:
        evaluate_bpb(model, torch.tensor([[0, 1, 2, 3, 1]]), TOKEN_BYTES, batch_size=1, device="cpu")
    assert "not a loss" in str(excinfo.value)
    assert model.training  # restored even after the error


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_logits_are_an_error(bad):
    class Broken(torch.nn.Module):
        def forward(self, inputs):
            logits = FixedLogits()(inputs).clone()
            logits[0, 1, 2] = bad
            return logits

    with pytest.raises(HarnessError, match="non-finite"):
        evaluate_bpb(Broken(), torch.tensor([[0, 1, 2, 3, 1]]), TOKEN_BYTES, batch_size=1, device="cpu")


def test_rows_without_bytes_are_an_error():
    with pytest.raises(HarnessError, match="no bytes"):
        evaluate_bpb(FixedLogits(), torch.zeros(2, 5, dtype=torch.int64), TOKEN_BYTES, batch_size=1, device="cpu")
