"""The packing loader: BOS-aligned best-fit rows, for training (as harness.feed serves them) and evaluation
(eval_rows).

The synthetic corpora here give every non-BOS token a value of its own, in ascending order through
the corpus, so a token in a row says which document it came from and where.
"""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from autoresearch.harness.feed import Feed
from autoresearch.harness.loader import eval_rows, pack_rows

BOS = 0


def make_corpus(lengths):
    """(tokens, doc_starts) of documents of the given lengths, BOS included; tokens 1, 2, 3, ..."""
    docs, next_id = [], 1
    for n in lengths:
        assert n >= 2, "a document holds BOS and at least one token"
        docs.append(np.concatenate([[BOS], np.arange(next_id, next_id + n - 1)]))
        next_id += n - 1
    tokens = np.concatenate(docs).astype(np.uint16)  # the dtype of prepared data
    doc_starts = np.cumsum([0] + list(lengths[:-1])).astype(np.int64)
    return tokens, doc_starts


def spans(tokens, doc_starts):
    ends = np.append(doc_starts[1:], len(tokens))
    return [(int(s), int(e)) for s, e in zip(doc_starts, ends)]


def random_lengths(n, low, high, seed=0):
    return [int(x) for x in np.random.default_rng(seed).integers(low, high, size=n)]


def pack(lengths, row_len, **kwargs):
    tokens, starts = make_corpus(lengths)
    return tokens, [list(r) for r in pack_rows(tokens, spans(tokens, starts), row_len, BOS, **kwargs)]


def doc_of(tokens, doc_starts):
    """Maps every non-BOS token to the index of its document."""
    ends = np.append(doc_starts[1:], len(tokens))
    return {int(t): d for d, (s, e) in enumerate(zip(doc_starts, ends)) for t in tokens[s + 1 : e]}


# --- pack_rows -------------------------------------------------------------------------------------

LENGTHS = random_lengths(300, 2, 100)  # documents from 1 to 98 tokens, many longer than a row
ROW = 33


def test_rows_have_the_requested_length_and_start_with_bos():
    _, rows = pack(LENGTHS, ROW, pad_last=True)
    assert all(len(row) == ROW for row in rows)
    assert all(row[0] == BOS for row in rows)


def test_no_token_is_invented_and_none_is_lost():
    tokens, rows = pack(LENGTHS, ROW, pad_last=True)
    packed = Counter(t for row in rows for t in row if t != BOS)
    assert packed == Counter(int(t) for t in tokens if t != BOS)


def test_each_piece_is_a_contiguous_span_of_one_document_behind_a_bos_of_its_own():
    tokens, starts = make_corpus(LENGTHS)
    document = doc_of(tokens, starts)
    rows = list(pack_rows(tokens, spans(tokens, starts), ROW, BOS, pad_last=True))
    for row in rows:
        for bos in np.flatnonzero(row == BOS):
            piece = [int(t) for t in itertools.takewhile(lambda t: t != BOS, row[bos + 1 :])]
            if piece:
                assert piece == list(range(piece[0], piece[0] + len(piece)))
                assert document[piece[0]] == document[piece[-1]]


def test_the_order_of_tokens_within_a_document_is_kept_across_its_pieces():
    tokens, starts = make_corpus(LENGTHS)
    document = doc_of(tokens, starts)
    rows = list(pack_rows(tokens, spans(tokens, starts), ROW, BOS, pad_last=True))
    where = {int(t): (r, c) for r, row in enumerate(rows) for c, t in enumerate(row) if t != BOS}
    by_document = {}
    for t in sorted(where):  # ascending token = reading order within its document
        by_document.setdefault(document[t], []).append(where[t])
    cut = 0
    for positions in by_document.values():
        assert positions == sorted(positions)
        cut += len({r for r, _ in positions}) > 1
    assert cut > 50  # many documents were split across rows, so this says something


def test_rows_hold_no_padding():
    tokens, rows = pack(LENGTHS, ROW)
    for row in rows:
        assert not any(a == b == BOS for a, b in zip(row, row[1:])), row
    # Every token is used but those of the last, partial row, which is dropped.
    _, padded = pack(LENGTHS, ROW, pad_last=True)
    assert rows == padded[:-1]
    used = sum(t != BOS for row in rows for t in row)
    assert 0 < int(np.sum(tokens != BOS)) - used < ROW


def test_the_last_partial_row_is_padded_with_bos_when_asked():
    _, rows = pack([5, 4], 12, pad_last=True)
    assert rows == [[BOS, 1, 2, 3, 4, BOS, 5, 6, 7, BOS, BOS, BOS]]
    _, rows = pack([5, 4], 12)
    assert rows == []


def test_best_fit_places_a_document_whole_when_it_fits_the_remaining_room():
    # Row of 10: the 7 goes first (the largest that fits), then the 3 fills the room exactly
    # instead of a 5 being cropped; the two 5s make the second row.
    _, rows = pack([7, 5, 3, 5], 10)
    doc7, doc5, doc3, doc5b = [BOS, 1, 2, 3, 4, 5, 6], [BOS, 7, 8, 9, 10], [BOS, 11, 12], [BOS, 13, 14, 15, 16]
    assert rows == [doc7 + doc3, doc5b + doc5]


def test_when_nothing_fits_the_shortest_document_is_cropped_and_its_rest_kept():
    _, rows = pack([7, 9, 5], 10, pad_last=True)
    # Row 1: the 9 fits; room 1: nothing fits, the shortest (the 5) is cropped to its BOS.
    # Row 2: the 7, then room 3: the rest of the 5 (4 tokens + a BOS of its own) is cropped again.
    # Row 3: what is left of it, then padding.
    assert rows == [
        [BOS, 7, 8, 9, 10, 11, 12, 13, 14, BOS],
        [BOS, 1, 2, 3, 4, 5, 6, BOS, 15, 16],
        [BOS, 17, 18, BOS, BOS, BOS, BOS, BOS, BOS, BOS],
    ]


def test_a_document_longer_than_a_row_is_not_thrown_away():
    # The reference keeps only the first row of such a document; here its rest follows in later
    # rows, each piece behind a BOS of its own.
    _, rows = pack([20], 8, pad_last=True)
    assert rows == [
        [BOS, 1, 2, 3, 4, 5, 6, 7],
        [BOS, 8, 9, 10, 11, 12, 13, 14],
        [BOS, 15, 16, 17, 18, 19, BOS, BOS],
    ]


def test_a_small_buffer_still_loses_nothing():
    tokens, rows = pack(LENGTHS, ROW, pad_last=True, buffer_docs=3)
    assert sorted(t for row in rows for t in row if t != BOS) == [int(t) for t in tokens if t != BOS]


# --- the training rows, as the lab's feed serves them ---------------------------------------------

def loader(lengths, seq_len=16, batch_size=4, seed=0):
    """(inputs, targets, epoch) batches of the training rows of `seed`, as harness.feed serves them."""
    tokens, starts = make_corpus(lengths)
    feed = Feed(tokens, starts, seq_len, BOS, vocab_size=int(tokens.max()) + 1)
    feed.start()
    while True:
        rows, epoch, _ = feed.rows(batch_size, seed)
        rows = torch.from_numpy(rows.astype(np.int64))
        yield rows[:, :-1], rows[:, 1:], epoch


def test_train_batches_are_int64_inputs_and_targets_shifted_by_one():
    inputs, targets, epoch = next(loader(LENGTHS, seq_len=32, batch_size=4))
    assert inputs.shape == targets.shape == (4, 32)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert (inputs[:, 0] == BOS).all()
    assert epoch == 0


def test_the_same_seed_gives_the_same_batches_and_another_seed_others():
    def first_batches(seed):
        return [torch.cat([x, y[:, -1:]], dim=1) for x, y, _ in itertools.islice(loader(LENGTHS, seed=seed), 5)]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("n_docs", [50, 1500], ids=["fewer-documents-than-the-buffer", "more-than-the-buffer"])
def test_the_epoch_counter_turns_after_a_pass_over_the_data(n_docs):
    lengths = random_lengths(n_docs, 2, 40, seed=n_docs)
    tokens, _ = make_corpus(lengths)
    corpus = {int(t) for t in tokens if t != BOS}
    rows = {0: [], 1: [], 2: []}
    for inputs, targets, epoch in loader(lengths, batch_size=1):  # one row per batch
        rows[epoch].append([t for t in torch.cat([inputs[0], targets[0, -1:]]).tolist() if t != BOS])
        if epoch == 2:
            break
    first_pass = Counter(t for row in rows[0] for t in row)
    assert max(first_pass.values()) == 1  # no token twice before every token has been seen once
    assert corpus - set(first_pass) <= set(rows[1][0])  # the rest is in the row where the epoch turns
    assert len(corpus - set(first_pass)) < 17  # less than a row
    second_pass = Counter(t for row in rows[1][1:] for t in row)
    assert max(second_pass.values()) == 1
    assert rows[0][0] != rows[1][1]  # each pass is shuffled afresh


def test_on_the_embedded_default_corpus_the_first_batches_are_in_epoch_zero(cpu_prepared):
    # Its 225 training documents are fewer than the packer's buffer of 1000.
    data = cpu_prepared
    feed = Feed(data.tokens("train"), data.doc_starts("train"), 256, data.tokenizer.bos_id, data.tokenizer.vocab_size)
    feed.start()
    assert [feed.rows(8, seed=0)[1] for _ in range(20)] == [0] * 20


def test_a_real_prepared_split_packs_into_rows_of_valid_tokens(small_prepared, tiny_profile):
    data = small_prepared
    inputs, targets, _ = next(loader_of(data, tiny_profile, 16))
    assert inputs.shape == (16, tiny_profile.seq_len)
    assert (inputs[:, 0] == data.tokenizer.bos_id).all()
    assert 0 <= int(inputs.min()) and int(targets.max()) < tiny_profile.vocab_size


def loader_of(data, profile, batch_size, seed=0):
    feed = Feed(data.tokens("train"), data.doc_starts("train"), profile.seq_len, data.tokenizer.bos_id,
                profile.vocab_size)
    feed.start()
    while True:
        rows = torch.from_numpy(feed.rows(batch_size, seed)[0].astype(np.int64))
        yield rows[:, :-1], rows[:, 1:], 0


# --- eval_rows -------------------------------------------------------------------------------------

def test_eval_rows_are_the_same_on_every_call():
    tokens, starts = make_corpus(LENGTHS)
    first = eval_rows(tokens, starts, 32, BOS, max_rows=50)
    assert all(np.array_equal(first, eval_rows(tokens, starts, 32, BOS, max_rows=50)) for _ in range(3))


def test_eval_rows_are_capped_at_max_rows():
    tokens, starts = make_corpus(LENGTHS)
    rows = eval_rows(tokens, starts, 32, BOS, max_rows=50)
    assert rows.shape == (50, 33)
    assert rows.dtype == np.int64
    # A larger cap extends the same rows: the first 50 do not depend on the cap.
    assert np.array_equal(eval_rows(tokens, starts, 32, BOS, max_rows=80)[:50], rows)


def test_a_split_smaller_than_the_cap_is_evaluated_whole():
    tokens, starts = make_corpus(LENGTHS)
    rows = eval_rows(tokens, starts, 32, BOS, max_rows=10**6)
    assert len(rows) < 10**6
    assert sorted(t for t in rows.flatten().tolist() if t != BOS) == [int(t) for t in tokens if t != BOS]
    last = rows[-1].tolist()
    padding = list(itertools.takewhile(lambda t: t == BOS, reversed(last)))
    assert 0 < len(padding) < 33 and last[0] == BOS  # the last row is padded with BOS

