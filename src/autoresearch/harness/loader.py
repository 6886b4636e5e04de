"""BOS-aligned best-fit packing of documents into rows, for training (harness.feed) and for evaluation.

Every row holds seq_len + 1 tokens and starts with BOS; inputs and targets are the row shifted by
one. A row is filled with the largest buffered document that fits; when none fits, the shortest is
cropped to fill the row exactly. Unlike the reference, the rest of a cropped document is not thrown
away: it goes back into the buffer, behind a BOS of its own, for a later row. No padding, no token
dropped or repeated within an epoch.
"""
from __future__ import annotations

import bisect
import itertools
from typing import Iterable, Iterator

import numpy as np

BUFFER_DOCS = 1000  # documents to choose from when filling a row: more packs tighter, costs more time
EPOCH_END = object()  # marks the end of an epoch in a stream of documents (see pack_rows)


def _epoch_documents(doc_starts: np.ndarray, n_tokens: int, seed: int | None, epoch: int):
    """(start, end) of every document for one epoch: shuffled by (seed, epoch), or in file order."""
    ends = np.append(doc_starts[1:], n_tokens)
    order = np.arange(len(doc_starts)) if seed is None else np.random.default_rng((seed, epoch)).permutation(len(doc_starts))
    for i in order:
        yield int(doc_starts[i]), int(ends[i])


def pack_rows(tokens: np.ndarray, documents: Iterable[tuple[int, int]], row_len: int, bos_id: int,
              buffer_docs: int = BUFFER_DOCS, pad_last: bool = False) -> Iterator[np.ndarray]:
    """Yield int64 rows of `row_len` tokens packed from `documents` (spans of `tokens`, each starting
    with BOS). When the documents run out the last, partial row is dropped, or with `pad_last`
    filled with BOS (which carries no bytes, so the metric ignores it).

    `documents` may hold EPOCH_END between epochs: no document after it enters the buffer before
    every piece of those before it has been placed, so a small corpus (fewer documents than the
    buffer) is not packed several epochs at once, repeating some documents before others are seen."""
    docs = iter(documents)
    finishing_epoch = False  # EPOCH_END met: refill only once the buffer is empty
    # Pieces sorted by length: (length, serial, start, end, needs_bos). A whole document already
    # starts with its BOS; the rest of a cropped one gets a BOS prepended (needs_bos).
    pieces: list[tuple[int, int, int, int, bool]] = []
    serial = itertools.count()
    exhausted = False
    while True:
        row = np.empty(row_len, dtype=np.int64)
        pos = 0
        while pos < row_len:
            finishing_epoch = finishing_epoch and bool(pieces)
            while not exhausted and not finishing_epoch and len(pieces) < buffer_docs:
                span = next(docs, None)
                if span is None:
                    exhausted = True
                elif span is EPOCH_END:
                    finishing_epoch = bool(pieces)
                elif span[1] > span[0]:
                    bisect.insort(pieces, (span[1] - span[0], next(serial), span[0], span[1], False))
            if not pieces:
                if pos and pad_last:
                    row[pos:] = bos_id
                    yield row
                return
            room = row_len - pos
            i = bisect.bisect_right(pieces, (room, float("inf"))) - 1
            length, _, start, end, needs_bos = pieces.pop(max(i, 0))
            take = min(length, room)  # i < 0: nothing fits, crop the shortest
            if needs_bos:
                row[pos] = bos_id
                row[pos + 1 : pos + take] = tokens[start : start + take - 1]
                consumed = take - 1
            else:
                row[pos : pos + take] = tokens[start : start + take]
                consumed = take
            pos += take
            if start + consumed < end:
                rest = end - start - consumed
                bisect.insort(pieces, (rest + 1, next(serial), start + consumed, end, True))
        yield row


def eval_rows(tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int, bos_id: int, max_rows: int) -> np.ndarray:
    """The fixed validation rows (int64, (rows, seq_len + 1)): documents in file order, packed once, at
    most `max_rows`. They depend only on the data and seq_len, never on anyone's batch size."""
    rows = pack_rows(tokens, _epoch_documents(doc_starts, len(tokens), None, 0), seq_len + 1, bos_id, pad_last=True)
    return np.stack(list(itertools.islice(rows, max_rows)))
