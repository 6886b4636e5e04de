"""The training data as the lab hands it out: rows of tokens, on request, counted.

The trainer never holds the training split. It asks for rows; before it says that training
started, it gets random tokens of the same shape (enough to compile and warm up on, useless to
learn from); after, the packed training rows, in an order fixed by the seed. Everything served
after the start is counted, and the start itself is stamped when it arrives: this is the lab's
evidence of when training began and how much data it used.

Rows are shared out among a data-parallel trainer's ranks deterministically: the stream of batches
is cut into chunks of the requested size, and rank r of k gets chunks r, r+k, r+2k, ... so k ranks
see, step for step, the same rows as one process accumulating k times as many micro-batches. The
chunks are cut a round (one per rank) at a time, at the size of the request that needed the round,
so a rank asking for another number of rows than its peers is refused whichever of them asked first.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .loader import EPOCH_END, _epoch_documents, pack_rows

TOKEN_DTYPE = np.uint16
MAX_ROWS_PER_REQUEST = 1 << 16


@dataclass
class _Stream:
    rows: object  # the packed rows of one seed, an iterator
    epoch: list = field(default_factory=lambda: [0])
    chunks: dict[int, deque] = field(default_factory=dict)  # rank -> chunks ready for it


class Feed:
    """Serves (rows, epoch) to the ranks of one trial and keeps the clock's evidence."""

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int, bos_id: int, vocab_size: int,
                 world_size: int = 1):
        self.tokens, self.doc_starts = tokens, doc_starts
        self.seq_len, self.bos_id, self.vocab_size, self.world_size = seq_len, bos_id, vocab_size, world_size
        self.started_at: float | None = None  # lab's monotonic clock: START arrived
        self.first_request_at: float | None = None
        self.closed_at: float | None = None  # nothing more is served from here on
        self.tokens_served = 0  # training tokens (inputs) served after the start
        self.requests = 0
        # Called once, as the first START arrives, before it is stamped and while no rows are served to any
        # rank: the lab's last look at the trainer before training rows reach it (lab.compile_cache).
        self.before_start = None
        self._streams: dict[int, _Stream] = {}
        self._random = np.random.default_rng()
        self._lock = threading.Lock()

    def start(self) -> float:
        """Training proper starts now (the first START wins); returns the time it was stamped."""
        with self._lock:
            if self.started_at is None:
                if self.before_start is not None:
                    self.before_start()
                self.started_at = time.monotonic()
            return self.started_at

    def close(self) -> bool:
        """Serve nothing more from now on; whether this call closed the feed (False: it was closed)."""
        with self._lock:
            if self.closed_at is not None:
                return False
            self.closed_at = time.monotonic()
            return True

    def rows(self, n: int, seed: int, rank: int = 0) -> tuple[np.ndarray, int, bool]:
        """(n rows of seq_len + 1 tokens, epoch, whether they are training data). Raises ValueError
        for a request the lab does not serve."""
        if not 1 <= n <= MAX_ROWS_PER_REQUEST:
            raise ValueError(f"a request for {n} rows (1 to {MAX_ROWS_PER_REQUEST})")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} of a world of {self.world_size}")
        with self._lock:
            if self.closed_at is not None:
                raise ValueError("the lab serves no more rows: the clock has stopped")
            self.requests += 1
            if self.first_request_at is None:
                self.first_request_at = time.monotonic()
            if self.started_at is None:
                return self._random_rows(n), 0, False
            stream = self._stream(int(seed))
            if not stream.chunks.get(rank):
                for r in range(self.world_size):  # a round: the next chunk of every rank, all of this size
                    chunk = np.stack([next(stream.rows) for _ in range(n)])
                    stream.chunks.setdefault(r, deque()).append((chunk, stream.epoch[0]))
            if len(stream.chunks[rank][0][0]) != n:
                raise ValueError(f"rank {rank} asked for {n} rows where another rank's request cut "
                                 f"{len(stream.chunks[rank][0][0])}: every rank must ask for the same number of "
                                 "rows at each step")
            chunk, epoch = stream.chunks[rank].popleft()
            self.tokens_served += n * self.seq_len
            return chunk.astype(TOKEN_DTYPE, copy=False), epoch, True

    def _random_rows(self, n: int) -> np.ndarray:
        rows = self._random.integers(0, self.vocab_size, size=(n, self.seq_len + 1), dtype=np.int64)
        rows[:, 0] = self.bos_id
        return rows.astype(TOKEN_DTYPE)

    def _stream(self, seed: int) -> _Stream:
        if seed not in self._streams:
            stream = _Stream(rows=None)

            def documents():
                for epoch in range(1 << 30):
                    stream.epoch[0] = epoch
                    yield from _epoch_documents(self.doc_starts, len(self.tokens), seed, epoch)
                    yield EPOCH_END

            stream.rows = pack_rows(self.tokens, documents(), self.seq_len + 1, self.bos_id)
            self._streams[seed] = stream
        return self._streams[seed]


def serve_trainer(sock, feed: Feed, settings: dict, on_checkpoint, key: str | None = None,
                  max_checkpoint: int = 1 << 36) -> None:
    """Answer one trainer process on `sock` until it closes the connection or hands in its checkpoint.

    `settings` are what a HELLO is answered with; `on_checkpoint(payload, stats, arrived_at)` takes the
    hand-in of rank 0, stamped with the lab's clock at its last byte. Only the first hand-in of a trial
    counts: it closes the feed, and a later one (from another connection) is refused, so a trainer
    cannot hand in early, train on, and replace it. A request the lab does not serve is answered with
    an error and ends the conversation."""
    from . import wire

    rank = None
    while True:
        message = wire.receive(sock, max_payload=max_checkpoint)
        if message is None:
            return
        kind, fields = message.kind, message.fields
        try:
            if kind == wire.Kind.HELLO:
                if key is not None and fields.get("key") != key:
                    raise ValueError("a hello without the trial's key")
                rank = int(fields.get("rank", 0))
                if not 0 <= rank < feed.world_size:
                    raise ValueError(f"rank {rank} in a run of {feed.world_size} process(es)")
                wire.send(sock, wire.Kind.SETTINGS, **settings, world_size=feed.world_size)
            elif rank is None:
                raise ValueError(f"{kind} before hello")
            elif kind == wire.Kind.BATCH:
                rows, epoch, training = feed.rows(int(fields["rows"]), int(fields.get("seed", 0)), rank)
                wire.send(sock, wire.Kind.ROWS, rows.tobytes(), epoch=epoch, training=training)
            elif kind == wire.Kind.START:
                if rank == 0:
                    feed.start()
                wire.send(sock, wire.Kind.START)
            elif kind == wire.Kind.CHECKPOINT:
                if rank != 0:
                    raise ValueError("only rank 0 hands in the checkpoint")
                if not feed.close():
                    raise ValueError("a checkpoint was handed in already: the clock has stopped")
                stats = fields.get("stats") if isinstance(fields.get("stats"), dict) else {}
                on_checkpoint(message.payload, stats, message.received_at)
                wire.send(sock, wire.Kind.CLOSED)
                return
            else:
                raise ValueError(f"a {kind} message")
        except (ValueError, KeyError, TypeError, OverflowError) as e:  # OverflowError: int(Infinity)
            wire.send(sock, wire.Kind.ERROR, message=str(e))
            return
