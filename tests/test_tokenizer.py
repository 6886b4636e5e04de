"""The tokenizer: a byte-level BPE trained with rustbpe, stored as plain text, used through tiktoken."""
from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import regex

from autoresearch.harness import HarnessError
from autoresearch.harness import tokenizer as tokenizer_lib
from autoresearch.harness.profiles import SPECIAL_TOKENS
from autoresearch.harness.tokenizer import META_FILE, RANKS_FILE, SPLIT_PATTERN

VOCAB = 512
NUMBERS = "12345 67890 " * 800  # makes the digit pairs frequent enough to be merged


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, corpus_texts):
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer_lib.train(corpus_texts["train"][:150] + [NUMBERS] * 5, VOCAB, out)
    return out


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return tokenizer_lib.load(tokenizer_dir, VOCAB)


def test_trains_to_exactly_the_vocab_size_with_four_special_tokens_bos_first(tok):
    assert tok.vocab_size == VOCAB
    assert tok.encoding.n_vocab == VOCAB
    specials = [tok.encoding.encode_single_token(name) for name in SPECIAL_TOKENS]
    assert specials == [VOCAB - 4, VOCAB - 3, VOCAB - 2, VOCAB - 1]  # after every ordinary token
    assert SPECIAL_TOKENS[0] == "<|bos|>"
    assert tok.bos_id == specials[0]


def test_the_256_single_bytes_are_all_tokens(tok):
    assert {tok.encoding.decode_single_token_bytes(i) for i in range(256)} == {bytes([b]) for b in range(256)}


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "  indented\n\ttabs\r\nand CRLF\n\n\n",
    "naïve café, 東京, emoji 🚀🧪, and U+FFFD itself: \ufffd",
    "In 1790 there were 3,929,214 people; in 2020, 331,449,281.",
    "",
])
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.bos_id for i in ids)
    assert tok.decode(ids) == text


def test_text_that_looks_like_a_special_token_is_encoded_as_ordinary_text(tok):
    ids = tok.encode("<|bos|>")
    assert tok.bos_id not in ids
    assert tok.decode(ids) == "<|bos|>"


def test_encode_batch_agrees_with_encode(tok, corpus_texts):
    texts = corpus_texts["val"][:20]
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]


def test_the_split_pattern_groups_digits_by_at_most_two():
    assert regex.findall(SPLIT_PATTERN, "12345") == ["12", "34", "5"]
    assert regex.findall(SPLIT_PATTERN, "in 2026") == ["in", " ", "20", "26"]


def test_numbers_are_tokenized_in_pairs_of_digits(tok):
    # The training text repeats "12345" thousands of times, yet "123" or "345" never become tokens.
    assert [tok.encoding.decode_single_token_bytes(i) for i in tok.encode("12345")] == [b"12", b"34", b"5"]
    vocabulary = [tok.encoding.decode_single_token_bytes(i) for i in range(tok.bos_id)]
    assert not [t for t in vocabulary if re.search(rb"\d{3}", t)]


def test_token_bytes_is_the_raw_byte_length_not_that_of_the_decoded_string(tok):
    lead_byte = tok.encoding.encode_single_token(b"\xe2")  # first byte of a 3-byte UTF-8 sequence
    assert tok.decode([lead_byte]) == "\ufffd"
    assert len(tok.decode([lead_byte]).encode("utf-8")) == 3  # what the reference counted
    assert tok.token_bytes()[lead_byte] == 1


def test_token_bytes_of_every_token(tok):
    token_bytes = tok.token_bytes()
    assert token_bytes.shape == (VOCAB,)
    for i in range(tok.bos_id):
        assert token_bytes[i] == len(tok.encoding.decode_single_token_bytes(i)) >= 1
    assert list(token_bytes[tok.bos_id :]) == [0, 0, 0, 0]  # special tokens carry no bytes


def test_token_bytes_of_an_encoding_sum_to_the_utf8_length_of_the_text(tok):
    text = "Grüße aus Köln — “quoted” 東京 🚀 and plain ASCII."
    ids = tok.encode(text)
    assert any(tok.decode([i]) == "\ufffd" for i in ids)  # some tokens hold part of a character
    assert int(np.sum(tok.token_bytes()[ids])) == len(text.encode("utf-8"))


def test_training_is_deterministic(tmp_path, corpus_texts, tok):
    again = tokenizer_lib.train(corpus_texts["train"][:150] + [NUMBERS] * 5, VOCAB, tmp_path)
    assert again.sha256 == tok.sha256


def test_loading_with_another_profiles_vocab_size_is_refused(tokenizer_dir):
    with pytest.raises(HarnessError, match="built for another profile") as excinfo:
        tokenizer_lib.load(tokenizer_dir, expected_vocab_size=2048)
    assert str(tokenizer_dir) in str(excinfo.value)
    assert "autoresearch prepare --profile" in str(excinfo.value)


def test_a_tampered_tokenizer_file_is_refused(tokenizer_dir, tmp_path):
    copy = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, copy)
    lines = (copy / RANKS_FILE).read_text().splitlines(keepends=True)
    (first, rank_a), (second, rank_b) = lines[300].split(), lines[301].split()
    lines[300], lines[301] = f"{first} {rank_b}\n", f"{second} {rank_a}\n"  # swap two merges' ranks
    (copy / RANKS_FILE).write_text("".join(lines))
    with pytest.raises(HarnessError, match="checksum") as excinfo:
        tokenizer_lib.load(copy, VOCAB)
    assert str(copy / RANKS_FILE) in str(excinfo.value)
    assert "prepare" in str(excinfo.value)


def test_a_missing_tokenizer_says_to_prepare(tmp_path):
    with pytest.raises(HarnessError, match="autoresearch prepare"):
        tokenizer_lib.load(tmp_path, VOCAB)


def test_the_stored_files_are_plain_text_and_json(tokenizer_dir, tok):
    assert sorted(p.name for p in tokenizer_dir.iterdir()) == [META_FILE, RANKS_FILE]
    lines = (tokenizer_dir / RANKS_FILE).read_text(encoding="ascii").splitlines()
    assert len(lines) == VOCAB - len(SPECIAL_TOKENS)
    for rank, line in enumerate(lines):
        token, stored_rank = line.split(" ")
        assert int(stored_rank) == rank
        assert tok.encoding.decode_single_token_bytes(rank) == base64.b64decode(token, validate=True)
    meta = json.loads((tokenizer_dir / META_FILE).read_text())
    assert meta["vocab_size"] == VOCAB
    assert meta["pattern"] == SPLIT_PATTERN
    assert meta["special_tokens"] == {name: VOCAB - 4 + i for i, name in enumerate(SPECIAL_TOKENS)}
    assert meta["ranks_sha256"] == hashlib.sha256((tokenizer_dir / RANKS_FILE).read_bytes()).hexdigest()


def test_the_identity_changes_with_the_split_pattern(tmp_path, tokenizer_dir, tok):
    # A changed pattern tokenizes differently: the harness fingerprint must see it.
    copy = tmp_path / "copy"
    shutil.copytree(tokenizer_dir, copy)
    meta = json.loads((copy / META_FILE).read_text())
    meta["pattern"] = meta["pattern"].replace("{1,2}", "{1,3}")
    (copy / META_FILE).write_text(json.dumps(meta))
    assert tokenizer_lib.load(copy, VOCAB).sha256 != tok.sha256


def test_training_text_too_small_for_the_vocabulary_is_an_error(tmp_path):
    with pytest.raises(HarnessError, match="too small"):
        tokenizer_lib.train(["a tiny text"], VOCAB, tmp_path)
    assert not (tmp_path / META_FILE).exists()


def test_a_vocabulary_without_room_for_the_bytes_and_specials_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="below 256"):
        tokenizer_lib.train(["text"], 259, tmp_path)


def test_encoding_works_without_rustbpe(tokenizer_dir, tok):
    """train.py's GPU machine has tiktoken but no rustbpe: loading and encoding must not need it."""
    script = textwrap.dedent("""
        import json, sys
        sys.modules["rustbpe"] = None  # any `import rustbpe` now raises ImportError
        from pathlib import Path
        from autoresearch.harness import tokenizer
        tok = tokenizer.load(Path(sys.argv[1]), 512)
        ids = tok.encode(sys.argv[2])
        try:
            import rustbpe
        except ImportError:
            rustbpe_missing = True
        else:
            rustbpe_missing = False
        print(json.dumps({"ids": ids, "text": tok.decode(ids), "bytes": int(tok.token_bytes()[ids].sum()),
                          "rustbpe_missing": rustbpe_missing}))
    """)
    text = "Mr. Speaker, the state of our Union is strong: 2026 — naïve 🚀"
    done = subprocess.run([sys.executable, "-c", script, str(tokenizer_dir), text],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out == {"ids": tok.encode(text), "text": text, "bytes": len(text.encode()), "rustbpe_missing": True}
