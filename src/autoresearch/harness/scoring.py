"""Scoring a model the lab does not trust: trusted code holds the rows, the model only answers.

The model runs in a sandbox of its own (harness.model_server) and is sent rows of tokens. For every
position it answers two numbers: the log-sum-exp of its logits and the logit of the next token.
The scorer, which holds the rows, turns those into bits per byte, in float64, over the targets that
carry bytes. The model process sees whole rows (the tokens it predicts among them) and may run any
code, so its answers are checked as they come:

- Bounds. A next-token logit above the log-sum-exp is a probability above 1, which no distribution
  gives: at any position, it voids the measurement (else one such answer could make the loss
  negative and the score anything).
- Probes. Some rows are sent twice: the row itself, scored at its first sight, and, once every row
  has been answered, a copy whose tokens from a random cut onwards are random (the token at the cut
  always differs), batched with other copies. Answers before the cut must not change: a model whose
  answers change reads tokens ahead of the one it predicts, or its batch-mates, or what it was shown
  before. Copies are never scored.
- Audits. After each batch the scorer asks for the whole logit vector at a few positions (the position
  just before every probe's cut, for the row and for its copy, and a few at random) and checks that
  the two numbers the model answered are the log-sum-exp and the next token's entry of that vector,
  and that the row and its copy have the same vector just before the cut. A model that put its mass
  on the token it reads ahead is caught there: its copy has another token after the cut.

What the checks catch, and what they cannot:
- A model that reads ahead (or makes up its answers) at a fraction f of positions escapes P probes
  with probability (1 - f)^P: a probe tests the one position before its cut. The default probes
  every row of an evaluation up to 512 rows (the cpu profile's), 512 up to 4096 rows (gpu24's), one
  row in 8 beyond (h100: 1280): below 1e-6 for f >= 2.7% with 512 probes, f >= 1.1% with 1280. One
  position a row (f = 1/T) escapes h100's probes about half the time, for 1/T of the loss.
- Differences below the tolerance pass: a model may lean towards the token it reads ahead by up to
  `tolerance` nats at every position (at most tolerance / (ln 2 x bytes per token) bits per byte).
- A model that remembers what it was shown can answer a copy as it answered its row (it shares the
  row's tokens up to the cut), and then reading ahead goes unseen. No check inside one process can
  tell: pass `fresh_model`, the same model in a second process that was shown nothing but copies,
  and the row and its copy are answered by processes that share no history.

The score does not depend on the order of the rows, their batch-mates or the probes, which are
drawn afresh each time from the operating system's randomness, out of the model's sight.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .errors import HarnessError

LOGITS_BYTES = {"cuda": 2 * 2**30, "mps": 2**30, "cpu": 2**28}  # memory for one batch of fp32 logits
TOLERANCE = {"cuda": 1e-3, "mps": 1e-3, "cpu": 1e-4}  # nats: an honest model answers the same row the same way
# rows: an evaluation this small probes every row, a larger one at least this many. Small evaluations
# are cheap to probe twice over, and they need it most: a model that reads ahead at the 2% of positions
# where that gains most escapes 128 probes 7.5% of the time, 512 probes 3e-5 of the time.
ALL_PROBED_UNDER = 512
PROBED_FRACTION = 8  # beyond that, one row in this many
RANDOM_AUDITS = 2  # vectors asked per batch at random positions, besides the probes'


class Model(Protocol):
    """What the scorer needs of a model: answers for a batch of rows, then vectors of that batch."""

    def answer(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For int rows (B, T+1): (log-sum-exp of the logits, logit of the token at t+1), each (B, T) float32."""

    def vectors(self, picks: list[tuple[int, int]]) -> np.ndarray:
        """The whole logit vectors (k, V) float32 of the last batch at (row in batch, position) picks."""


class ModelMisbehaved(HarnessError):
    """The model's answers broke a probe or an audit: the measurement is void."""


def eval_batch_size(device_type: str, seq_len: int, vocab_size: int) -> int:
    per_row = seq_len * vocab_size * 4
    size = 1
    while size * 2 * per_row <= LOGITS_BYTES.get(device_type, 2**28):
        size *= 2
    return size


@dataclass
class Score:
    bpb: float
    nats: float
    bytes: int
    rows: int
    probes: int
    audits: int
    worst_difference: float  # the largest disagreement the checks found (nats)
    tolerance: float
    batches: int = 0
    seconds: dict = field(default_factory=dict)  # by part, as the lab timed them (load, rows, fresh_load, copies)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Item:
    row: int  # index into the rows being scored
    cut: int | None = None  # a probe's copy: tokens from this index on are random
    tokens: np.ndarray | None = None  # the copy's tokens


@dataclass
class _FirstSight:
    """What the model answered for a probed row, for its copy to be compared with."""

    lse: np.ndarray
    z: np.ndarray
    vector: np.ndarray  # the logit vector just before the cut


def _floats(array, shape: tuple[int, ...], what: str) -> np.ndarray:
    """The model's answer as float64, if it is an array of `shape`; otherwise the model misbehaved."""
    if tuple(getattr(array, "shape", ()) or ()) != shape:
        raise ModelMisbehaved(f"The model answered {what} of shape {getattr(array, 'shape', type(array).__name__)} "
                              f"where {shape} was due.")
    try:
        return np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ModelMisbehaved(f"The model answered {what} that are not numbers ({type(e).__name__}: {e}).") from None


class Scorer:
    """Scores `rows` (N, T+1) against `token_bytes` (V,) on any Model, with probes and audits."""

    def __init__(self, rows: np.ndarray, token_bytes: np.ndarray, batch_size: int, tolerance: float,
                 probes: int | None = None, seed: int | None = None):
        self.rows = np.asarray(rows)
        self.token_bytes = np.asarray(token_bytes, dtype=np.int64)
        self.batch_size = batch_size
        self.tolerance = tolerance
        n = len(self.rows)
        self.n_probes = min(n, max(-(-n // PROBED_FRACTION), min(n, ALL_PROBED_UNDER))) if probes is None else probes
        self.rng = np.random.default_rng(secrets.randbits(64) if seed is None else seed)
        self.worst = 0.0
        self.audits = 0
        self.batches = 0

    def _schedule(self) -> tuple[list[_Item], list[_Item]]:
        """The rows in a random order, and the probes' copies in a random order."""
        n, width = self.rows.shape
        T, V = width - 1, len(self.token_bytes)
        rows = [_Item(int(i)) for i in self.rng.permutation(n)]
        copies = []
        for row in self.rng.choice(n, size=self.n_probes, replace=False):  # a random order
            cut = int(self.rng.integers(1, T + 1))  # tokens[cut:] change; positions < cut are compared
            tokens = self.rows[row].copy()
            tokens[cut] = (tokens[cut] + self.rng.integers(1, V)) % V  # another token right after the cut
            tokens[cut + 1:] = self.rng.integers(0, V, size=width - cut - 1)
            copies.append(_Item(int(row), cut, tokens))
        return rows, copies

    def _batches(self, items: list[_Item]):
        for start in range(0, len(items), self.batch_size):
            yield items[start:start + self.batch_size]

    def _answer(self, model: Model, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model's (lse, z) for `tokens`, sent as a full batch, checked for shape and bounds."""
        b, width = tokens.shape
        padded = tokens
        if b < self.batch_size:  # every batch has one shape, so an honest model computes alike
            padded = np.concatenate([tokens, np.repeat(tokens[-1:], self.batch_size - b, axis=0)])
        answers = model.answer(padded.astype(np.int64))
        if not isinstance(answers, tuple) or len(answers) != 2:
            raise ModelMisbehaved(f"The model answered a {type(answers).__name__} where a pair of arrays (log-sum-exp, "
                                  "next-token logit) was due.")
        expected = (len(padded), width - 1)
        lse = _floats(answers[0], expected, "log-sum-exps")[:b]
        z = _floats(answers[1], expected, "next-token logits")[:b]
        self.batches += 1
        if not (np.isfinite(lse).all() and np.isfinite(z).all()):
            raise HarnessError("The model's logits are not finite (NaN or inf) on the evaluation rows.")
        excess = z - lse
        if excess.max() > self.tolerance:
            k, t = np.unravel_index(int(excess.argmax()), excess.shape)
            raise ModelMisbehaved(
                f"At position {t} of a row the model answered a next-token logit of {z[k, t]:.4f} above the "
                f"log-sum-exp of its logits, {lse[k, t]:.4f}: a probability above 1, which no logits give.")
        return lse, z

    def _audit(self, model: Model, tokens: np.ndarray, lse: np.ndarray, z: np.ndarray,
               picks: list[tuple[int, int]]) -> np.ndarray:
        """Ask for the logit vectors at `picks` and at a few random positions, check each against the
        answers; return those at `picks`."""
        b, width = tokens.shape
        picks = picks + [(int(self.rng.integers(b)), int(self.rng.integers(width - 1))) for _ in range(RANDOM_AUDITS)]
        vectors = _floats(model.vectors(picks), (len(picks), len(self.token_bytes)), "logit vectors")
        for (k, t), v in zip(picks, vectors):
            self.audits += 1
            top = float(v.max())
            with np.errstate(all="ignore"):  # a vector of inf or NaN gives NaN here, and fails below
                off = max(abs(top + math.log(np.exp(v - top).sum()) - lse[k, t]), abs(v[tokens[k, t + 1]] - z[k, t]))
            self.worst = max(self.worst, off if math.isfinite(off) else math.inf)
            if not off <= self.tolerance:
                raise ModelMisbehaved(
                    f"At position {t} of a row the model answered a log-sum-exp of {lse[k, t]:.4f} and a "
                    f"next-token logit of {z[k, t]:.4f}, but its logits there say otherwise (off by "
                    f"{off:.2e}, tolerance {self.tolerance:.0e}): its answers are not its logits.")
        return vectors[:len(picks) - RANDOM_AUDITS]

    def score(self, model: Model, fresh_model: Model | None = None) -> Score:
        """Bits per byte of `model` on the rows. `fresh_model`, if given, is the same model in a process
        of its own that has been shown nothing: it answers the probes' copies (see the module's
        docstring for why that matters)."""
        n, width = self.rows.shape
        weights = self.token_bytes[self.rows[:, 1:]]
        counted = weights > 0
        nbytes = int(weights[counted].sum())
        if nbytes == 0:
            raise HarnessError("The evaluation rows hold no bytes to score (every target is a special token); "
                               "the split is empty.")
        self.worst, self.audits, self.batches = 0.0, 0, 0
        rows, copies = self._schedule()
        cut_of = {item.row: item.cut for item in copies}
        first: dict[int, _FirstSight] = {}
        nats = 0.0
        for batch in self._batches(rows):
            tokens = self.rows[[item.row for item in batch]]
            lse, z = self._answer(model, tokens)
            for k, item in enumerate(batch):
                nats += float((lse[k] - z[k])[counted[item.row]].sum())
            probed = [k for k, item in enumerate(batch) if item.row in cut_of]
            vectors = self._audit(model, tokens, lse, z, [(k, cut_of[batch[k].row] - 1) for k in probed])
            for k, vector in zip(probed, vectors):
                first[batch[k].row] = _FirstSight(lse[k], z[k], vector)
        for batch in self._batches(copies):
            tokens = np.stack([item.tokens for item in batch])
            answering = fresh_model if fresh_model is not None else model
            lse, z = self._answer(answering, tokens)
            vectors = self._audit(answering, tokens, lse, z, [(k, item.cut - 1) for k, item in enumerate(batch)])
            for k, item in enumerate(batch):
                seen, c = first[item.row], item.cut
                diff = max(float(np.abs(lse[k, :c] - seen.lse[:c]).max()),
                           float(np.abs(z[k, :c - 1] - seen.z[:c - 1]).max()) if c > 1 else 0.0,
                           float(np.abs(vectors[k] - seen.vector).max()))
                self.worst = max(self.worst, diff)
                if not diff <= self.tolerance:
                    raise ModelMisbehaved(self._differs(item, diff))
        bpb = nats / (math.log(2) * nbytes)
        if not math.isfinite(bpb):
            raise HarnessError("The model's logits gave a non-finite loss (NaN or inf) on the evaluation rows.")
        return Score(bpb=bpb, nats=nats, bytes=nbytes, rows=n, probes=self.n_probes, audits=self.audits,
                     worst_difference=self.worst, tolerance=self.tolerance, batches=self.batches)

    def _differs(self, item: _Item, diff: float) -> str:
        return (f"The model's answers before position {item.cut} of a row changed by {diff:.2e} nats (tolerance "
                f"{self.tolerance:.0e}) when the tokens from {item.cut} on were changed and the row was sent again "
                "later, among other rows. An honest model's answer at a position depends only on the tokens up "
                "to it: this one reads tokens ahead of the one it predicts, or its batch-mates, or rows it was "
                "shown before.")


class RemoteModel:
    """A model answering from another process (the sandboxed model server) over the lab's socket."""

    def __init__(self, sock, seq_len: int, vocab_size: int):
        from . import wire

        self.wire, self.sock, self.seq_len, self.vocab_size = wire, sock, seq_len, vocab_size

    def _exchange(self, kind, payload: bytes, due: int, **fields):
        """Send a request; the reply, read only if it holds at most the `due` bytes of an answer."""
        self.wire.send(self.sock, kind, payload, **fields)
        reply = self.wire.receive(self.sock, max_payload=due)
        if reply is None:
            raise HarnessError("The model's process ended while it was being scored.")
        if reply.kind == self.wire.Kind.ERROR:
            raise HarnessError(f"The model failed while it was being scored: {reply.fields.get('message')}")
        return reply

    def answer(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        B, width = rows.shape
        expected = 2 * B * (width - 1) * 4
        reply = self._exchange(self.wire.Kind.SCORE, rows.astype(np.uint16).tobytes(), expected, rows=B, width=width)
        if reply.kind != self.wire.Kind.SCORES or len(reply.payload) != expected:
            raise ModelMisbehaved(f"The model answered {len(reply.payload)} bytes ({reply.kind}) for {B} rows, "
                                  f"where {expected} were due.")
        both = np.frombuffer(reply.payload, dtype=np.float32).reshape(2, B, width - 1)
        return both[0], both[1]

    def vectors(self, picks: list[tuple[int, int]]) -> np.ndarray:
        expected = len(picks) * self.vocab_size * 4
        reply = self._exchange(self.wire.Kind.AUDIT, b"", expected, picks=[list(p) for p in picks])
        if reply.kind != self.wire.Kind.VECTORS or len(reply.payload) != expected:
            raise ModelMisbehaved(f"The model answered {len(reply.payload)} bytes ({reply.kind}) for "
                                  f"{len(picks)} logit vectors, where {expected} were due.")
        return np.frombuffer(reply.payload, dtype=np.float32).reshape(len(picks), self.vocab_size)
