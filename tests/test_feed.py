"""The training data as the lab hands it out (harness.feed): Feed, and serve_trainer over a real socket.

The feed is the lab's evidence of when training began and how much data it used: before START it
serves random rows that teach nothing and are not counted; after it, the packed training rows of the
seed, every one counted. These run on the embedded default corpus prepared for the `cpu` profile
(sequence 256, vocab 2048), and on small corpora made here.
"""
from __future__ import annotations

import itertools
import socket
import threading
import time

import numpy as np
import pytest

from autoresearch.harness import wire
from autoresearch.harness.feed import MAX_ROWS_PER_REQUEST, Feed, serve_trainer
from autoresearch.harness.loader import EPOCH_END, pack_rows
from autoresearch.harness.wire import Kind

KEY = "the-trials-key"
PATIENCE = 10.0  # seconds a test waits for the lab's answer before calling it a hang


def training_rows(tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int, bos_id: int, seed: int):
    """The rows the feed owes after the start, derived here from the loader's rules: every epoch the
    documents shuffled by (seed, epoch), packed best-fit into rows of seq_len + 1 tokens."""
    ends = np.append(doc_starts[1:], len(tokens))

    def documents():
        for epoch in itertools.count():
            for i in np.random.default_rng((seed, epoch)).permutation(len(doc_starts)):
                yield int(doc_starts[i]), int(ends[i])
            yield EPOCH_END

    return pack_rows(tokens, documents(), seq_len + 1, bos_id)


def synthetic_corpus(documents: int, vocab: int, bos_id: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Documents of 5 to 60 tokens, each starting with BOS, as prepared data stores them."""
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[bos_id], rng.integers(0, bos_id, size=rng.integers(4, 60))]) for _ in range(documents)]
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    return np.concatenate(docs).astype(np.uint16), starts


@pytest.fixture
def data(cpu_prepared):
    return cpu_prepared


def cpu_feed(data, world_size: int = 1) -> Feed:
    return Feed(data.tokens("train"), data.doc_starts("train"), 256, data.tokenizer.bos_id, 2048, world_size)


def expected_rows(data, seed: int, n: int) -> np.ndarray:
    rows = training_rows(data.tokens("train"), data.doc_starts("train"), 256, data.tokenizer.bos_id, seed)
    return np.stack(list(itertools.islice(rows, n)))


# --- before the start -------------------------------------------------------------------------------
def test_rows_before_the_start_are_random_and_not_counted(data):
    feed = cpu_feed(data)
    training = expected_rows(data, seed=0, n=64)
    rows, epoch, is_training = feed.rows(8, seed=0)
    assert (rows.shape, rows.dtype, epoch, is_training) == ((8, 257), np.uint16, 0, False)
    assert (rows[:, 0] == data.tokenizer.bos_id).all()
    assert not any((row == known).all() for row in rows for known in training)
    assert (feed.tokens_served, feed.requests, feed.started_at) == (0, 1, None)
    assert feed.first_request_at is not None


def test_random_rows_are_uniform_over_the_vocabulary():
    tokens, starts = synthetic_corpus(50, vocab=16, bos_id=12)
    feed = Feed(tokens, starts, seq_len=64, bos_id=12, vocab_size=16)
    rows = np.concatenate([feed.rows(100, seed=0)[0] for _ in range(4)])
    counts = np.bincount(rows[:, 1:].ravel(), minlength=16)  # 25,600 draws: 1,600 expected, sd 39
    assert len(counts) == 16 and np.abs(counts - 1600).max() < 250
    assert not np.array_equal(feed.rows(4, seed=0)[0], feed.rows(4, seed=0)[0])  # drawn afresh each time


# --- after the start --------------------------------------------------------------------------------
def test_after_the_start_the_rows_are_the_packed_training_rows_of_the_seed_in_order(data):
    feed = cpu_feed(data)
    feed.rows(8, seed=3)  # warm-up rows take nothing from the stream
    feed.start()
    served = [feed.rows(n, seed=3) for n in (4, 4, 8)]
    assert all(is_training and epoch == 0 for _, epoch, is_training in served)
    assert all(rows.dtype == np.uint16 for rows, _, _ in served)
    assert np.array_equal(np.concatenate([rows for rows, _, _ in served]), expected_rows(data, seed=3, n=16))
    assert feed.tokens_served == 16 * 256  # inputs: seq_len tokens a row
    assert feed.requests == 4


def test_the_seed_decides_the_order_and_nothing_else_does():
    # More documents than the packer buffers (loader.BUFFER_DOCS): with fewer, best-fit packing takes
    # them by length whatever their order, and every seed gives the same rows.
    tokens, starts = synthetic_corpus(3000, vocab=500, bos_id=499)
    first, again, other = (Feed(tokens, starts, seq_len=32, bos_id=499, vocab_size=500) for _ in range(3))
    for feed in (first, again, other):
        feed.start()
    rows = first.rows(6, seed=1)[0]
    assert np.array_equal(rows, again.rows(6, seed=1)[0])
    assert not np.array_equal(rows, other.rows(6, seed=2)[0])
    assert np.array_equal(rows, np.stack(list(itertools.islice(training_rows(tokens, starts, 32, 499, 1), 6))))


def test_the_epoch_turns_once_every_token_of_the_split_was_served():
    tokens, starts = synthetic_corpus(40, vocab=100, bos_id=99)
    feed = Feed(tokens, starts, seq_len=16, bos_id=99, vocab_size=100)
    feed.start()
    epochs = [feed.rows(1, seed=0)[1] for _ in range(3 * len(tokens) // 17)]
    assert epochs == sorted(epochs) and epochs[-1] >= 1
    assert epochs.index(1) >= len(tokens) // 17  # no token dropped or repeated within an epoch


def test_the_first_start_wins(data):
    feed = cpu_feed(data)
    first = feed.start()
    time.sleep(0.01)
    assert feed.start() == first == feed.started_at


def test_after_close_nothing_is_served(data):
    feed = cpu_feed(data)
    feed.start()
    feed.rows(2, seed=0)
    assert feed.close() is True
    closed = feed.closed_at
    assert feed.close() is False and feed.closed_at == closed  # the first close stamps the time
    with pytest.raises(ValueError, match="the clock has stopped"):
        feed.rows(2, seed=0)
    assert feed.tokens_served == 2 * 256


@pytest.mark.parametrize("n, rank, why", [
    (0, 0, "a request for 0 rows"), (-3, 0, "a request for -3 rows"),
    (MAX_ROWS_PER_REQUEST + 1, 0, f"a request for {MAX_ROWS_PER_REQUEST + 1} rows"),
    (2, 1, "rank 1 of a world of 1"), (2, -1, "rank -1 of a world of 1"),
])
def test_requests_the_lab_does_not_serve_are_refused_and_not_counted(data, n, rank, why):
    feed = cpu_feed(data)
    feed.start()
    with pytest.raises(ValueError, match=why):
        feed.rows(n, seed=0, rank=rank)
    assert (feed.tokens_served, feed.requests) == (0, 0)


# --- data-parallel ranks ----------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["in-turn", "rank-1-first", "rank-0-ahead"])
def test_two_ranks_get_step_for_step_the_rows_of_one_process_with_twice_the_micro_batches(data, order):
    one, two = cpu_feed(data), cpu_feed(data, world_size=2)
    one.start()
    two.start()
    steps = 5
    single = [[one.rows(3, seed=4)[0] for _ in range(2)] for _ in range(steps)]  # two micro-batches a step
    asks = {"in-turn": [(s, r) for s in range(steps) for r in (0, 1)],
            "rank-1-first": [(s, r) for s in range(steps) for r in (1, 0)],
            "rank-0-ahead": [(s, 0) for s in range(steps)] + [(s, 1) for s in range(steps)]}[order]
    for step, rank in asks:
        assert np.array_equal(two.rows(3, seed=4, rank=rank)[0], single[step][rank]), (step, rank)
    assert two.tokens_served == one.tokens_served == steps * 2 * 3 * 256


@pytest.mark.parametrize("first, second", [((0, 4), (1, 2)), ((1, 2), (0, 4))])
def test_ranks_asking_for_different_numbers_of_rows_are_told_so_whoever_asks_first(data, first, second):
    feed = cpu_feed(data, world_size=2)
    feed.start()
    feed.rows(first[1], seed=0, rank=first[0])
    with pytest.raises(ValueError, match="every rank must ask for the same number of rows at each step"):
        feed.rows(second[1], seed=0, rank=second[0])


# --- serve_trainer, over a real socket --------------------------------------------------------------
class Lab:
    """serve_trainer answering one connection in a thread, as the supervisor runs it."""

    def __init__(self, feed: Feed, settings: dict | None = None, key: str | None = KEY):
        self.feed = feed
        self.settings = settings if settings is not None else {"time_budget": 5.0, "device": "cpu"}
        self.checkpoints: list[tuple[bytes, dict, float]] = []
        self.failure: BaseException | None = None
        self.key = key

    def connect(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        theirs.settimeout(PATIENCE)
        self.thread = threading.Thread(target=self._serve, args=(ours,), daemon=True)
        self.thread.start()
        return theirs

    def _serve(self, sock: socket.socket) -> None:
        try:
            serve_trainer(sock, self.feed, self.settings,
                          lambda payload, stats, at: self.checkpoints.append((payload, stats, at)), key=self.key)
        except BaseException as e:  # noqa: BLE001 - the test looks at what ended the conversation
            self.failure = e
        finally:
            sock.close()

    def done(self) -> None:
        self.thread.join(PATIENCE)
        assert not self.thread.is_alive()


def ask(sock: socket.socket, kind: Kind, payload: bytes = b"", **fields) -> wire.Message | None:
    wire.send(sock, kind, payload, **fields)
    return wire.receive(sock)


def hello(sock: socket.socket, rank: int = 0, key: str | None = KEY) -> wire.Message:
    return ask(sock, Kind.HELLO, rank=rank, world_size=1, key=key)


def refused(reply: wire.Message | None, sock: socket.socket, lab: Lab, why: str) -> None:
    """The lab answered with an error saying `why`, then hung up; its thread ended cleanly."""
    assert reply is not None and reply.kind is Kind.ERROR, reply
    assert why in reply.fields["message"]
    assert wire.receive(sock) is None
    lab.done()
    assert lab.failure is None


def test_a_hello_with_the_key_is_answered_with_the_settings(data):
    lab = Lab(cpu_feed(data, world_size=2), settings={"time_budget": 7.5, "seed": 3, "device": "cpu"})
    sock = lab.connect()
    reply = hello(sock, rank=1)
    assert reply.kind is Kind.SETTINGS
    assert reply.fields == {"time_budget": 7.5, "seed": 3, "device": "cpu", "world_size": 2}


@pytest.mark.parametrize("key", [None, "a-guess"], ids=["no-key", "wrong-key"])
def test_a_hello_without_the_key_is_refused(data, key):
    lab = Lab(cpu_feed(data))
    sock = lab.connect()
    refused(hello(sock, key=key), sock, lab, "a hello without the trial's key")
    assert lab.feed.requests == 0


def test_a_request_before_hello_is_refused(data):
    lab = Lab(cpu_feed(data))
    sock = lab.connect()
    refused(ask(sock, Kind.BATCH, rows=2, seed=0), sock, lab, "batch before hello")
    assert lab.feed.requests == 0


def test_a_rank_outside_the_world_is_refused(data):
    lab = Lab(cpu_feed(data, world_size=2))
    sock = lab.connect()
    refused(hello(sock, rank=2), sock, lab, "rank 2 in a run of 2 process(es)")


def test_batches_are_random_before_start_and_training_rows_after_it(data):
    lab = Lab(cpu_feed(data))
    sock = lab.connect()
    hello(sock)
    before = ask(sock, Kind.BATCH, rows=2, seed=5)
    assert before.kind is Kind.ROWS and before.fields == {"epoch": 0, "training": False}
    assert ask(sock, Kind.START).kind is Kind.START
    assert lab.feed.started_at is not None
    after = ask(sock, Kind.BATCH, rows=2, seed=5)
    assert after.fields == {"epoch": 0, "training": True}
    rows = np.frombuffer(after.payload, dtype=np.uint16).reshape(2, 257)
    assert np.array_equal(rows, expected_rows(data, seed=5, n=2))
    assert lab.feed.tokens_served == 2 * 256


def test_only_rank_0_starts_the_clock(data):
    lab = Lab(cpu_feed(data, world_size=2))
    sock = lab.connect()
    hello(sock, rank=1)
    assert ask(sock, Kind.START).kind is Kind.START
    assert lab.feed.started_at is None
    assert ask(sock, Kind.BATCH, rows=2, seed=0).fields["training"] is False


def test_a_checkpoint_from_rank_1_is_refused(data):
    lab = Lab(cpu_feed(data, world_size=2))
    sock = lab.connect()
    hello(sock, rank=1)
    refused(ask(sock, Kind.CHECKPOINT, b"weights", stats={}), sock, lab, "only rank 0 hands in the checkpoint")
    assert lab.checkpoints == [] and lab.feed.closed_at is None


def test_the_checkpoint_is_stamped_at_its_last_byte_and_closes_the_feed(data):
    lab = Lab(cpu_feed(data))
    sock = lab.connect()
    hello(sock)
    ask(sock, Kind.START)
    payload = bytes(range(256)) * 4000
    head = wire.json.dumps({"stats": {"num_steps": 12}, "kind": "checkpoint", "size": len(payload)}).encode()
    sock.sendall(wire.struct.pack("<I", len(head)) + head + payload[:-1])
    time.sleep(0.3)  # a slow hand-in: the clock runs until the last byte is in
    last_byte_sent = time.monotonic()
    sock.sendall(payload[-1:])
    assert wire.receive(sock).kind is Kind.CLOSED
    assert wire.receive(sock) is None
    lab.done()
    [(received, stats, arrived)] = lab.checkpoints
    assert received == payload and stats == {"num_steps": 12}
    assert arrived >= last_byte_sent and lab.feed.closed_at is not None
    second = lab.connect()  # nothing more is served once the clock stopped
    hello(second)
    refused(ask(second, Kind.BATCH, rows=1, seed=0), second, lab, "the clock has stopped")


def test_a_second_checkpoint_is_refused_the_first_one_stopped_the_clock(data):
    lab = Lab(cpu_feed(data))
    early, late = lab.connect(), lab.connect()  # a trainer may open two connections
    hello(early)
    hello(late)
    ask(early, Kind.START)
    assert ask(early, Kind.CHECKPOINT, b"early weights", stats={}).kind is Kind.CLOSED
    refused(ask(late, Kind.CHECKPOINT, b"weights trained on after the clock stopped", stats={}), late, lab,
            "a checkpoint was handed in already")
    assert [payload for payload, _, _ in lab.checkpoints] == [b"early weights"]


def test_stats_that_are_not_a_mapping_are_dropped(data):
    lab = Lab(cpu_feed(data))
    sock = lab.connect()
    hello(sock)
    assert ask(sock, Kind.CHECKPOINT, b"w", stats=[1, 2]).kind is Kind.CLOSED
    assert lab.checkpoints[0][1] == {}


@pytest.mark.parametrize("kind, fields, why", [
    (Kind.BATCH, {"rows": 0}, "a request for 0 rows"),
    (Kind.BATCH, {"rows": "many"}, "invalid literal"),
    (Kind.BATCH, {"rows": float("inf")}, "infinity"),
    (Kind.BATCH, {}, "rows"),
    (Kind.BATCH, {"rows": 2, "seed": -1}, "negative"),
    (Kind.SCORE, {}, "a score message"),
], ids=["zero-rows", "not-a-number", "infinite", "no-rows", "negative-seed", "not-a-trainer-message"])
def test_a_request_the_lab_does_not_serve_is_answered_with_an_error(data, kind, fields, why):
    lab = Lab(cpu_feed(data))
    sock = lab.connect()
    hello(sock)
    ask(sock, Kind.START)
    refused(ask(sock, kind, **fields), sock, lab, why)
    assert lab.feed.tokens_served == 0


def test_a_frame_that_breaks_the_protocol_ends_the_conversation_with_a_wire_error(data):
    lab = Lab(cpu_feed(data))
    sock = lab.connect()
    sock.sendall(wire.struct.pack("<I", 7) + b"garbage")
    assert wire.receive(sock) is None
    lab.done()
    assert isinstance(lab.failure, wire.WireError)  # what the supervisor catches


def test_the_trainer_hanging_up_ends_the_conversation_quietly(data):
    lab = Lab(cpu_feed(data))
    sock = lab.connect()
    hello(sock)
    sock.close()
    lab.done()
    assert lab.failure is None
