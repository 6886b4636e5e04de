"""Byte-level BPE: trained with rustbpe, stored and used as a tiktoken encoding.

Only training needs rustbpe; encoding needs tiktoken alone, so a GPU box without rustbpe can run
train.py on data prepared elsewhere. The stored form is plain text and JSON, never a pickle.
"""
from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import HarnessError
from .profiles import SPECIAL_TOKENS
from .storage import atomic_path

# GPT-4's split pattern, with numbers split into groups of one or two digits instead of three.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
TRAIN_DOC_CHARS = 10_000  # longer documents add little to merge statistics and cost time
TRAIN_MAX_CHARS = 2_000_000_000
RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"


@dataclass
class Tokenizer:
    """A tiktoken encoding plus what the metric needs: the raw byte length of every token."""

    encoding: "tiktoken.Encoding"  # noqa: F821
    vocab_size: int
    bos_id: int
    sha256: str  # of the merge table, split pattern and special tokens: part of the harness fingerprint

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids))

    def token_bytes(self) -> np.ndarray:
        """Bytes each token stands for, special tokens 0. The raw byte length, not that of the decoded
        string: a token holding part of a UTF-8 sequence decodes to U+FFFD (3 bytes) but is 1 byte."""
        special = set(self.encoding.special_tokens_set)
        out = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            token = self.encoding.decode_single_token_bytes(i)
            out[i] = 0 if token.decode("latin-1") in special else len(token)
        return out


def train(texts: Iterable[str], vocab_size: int, out_dir: Path, what: str = "The tokenizer training text") -> Tokenizer:
    """Train a BPE of `vocab_size` tokens (special ones included) and save it in `out_dir`.
    `what` names the text in the error raised when it is too small."""
    import rustbpe  # only here: encoding does not need it

    n_merged = vocab_size - len(SPECIAL_TOKENS)
    if n_merged < 256:
        raise ValueError(f"vocab_size {vocab_size} is below 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(_capped(texts), n_merged, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    if len(ranks) != n_merged:
        raise HarnessError(
            f"{what} yielded only {len(ranks)} tokens, fewer than the {n_merged} the profile asks "
            f"for: it is too small for vocab {vocab_size}. Give it more text, or use a profile with a "
            "smaller vocabulary."
        )
    save(ranks, out_dir)
    return load(out_dir, vocab_size)


def _capped(texts: Iterable[str]) -> Iterator[str]:
    total = 0
    for text in texts:
        text = text[:TRAIN_DOC_CHARS]
        total += len(text)
        yield text
        if total >= TRAIN_MAX_CHARS:
            return


def save(ranks: dict[bytes, int], out_dir: Path) -> None:
    lines = "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    with atomic_path(out_dir / RANKS_FILE) as tmp:
        tmp.write_text(lines)
    meta = {
        "pattern": SPLIT_PATTERN,
        "special_tokens": {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)},
        "vocab_size": len(ranks) + len(SPECIAL_TOKENS),
        "ranks_sha256": hashlib.sha256(lines.encode()).hexdigest(),
    }
    with atomic_path(out_dir / META_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")


def load(directory: Path, expected_vocab_size: int | None = None) -> Tokenizer:
    """Load a saved tokenizer; `expected_vocab_size` guards against one built for another profile."""
    import tiktoken

    ranks_path, meta_path = directory / RANKS_FILE, directory / META_FILE
    if not ranks_path.is_file() or not meta_path.is_file():
        raise HarnessError(
            f"No tokenizer in {directory} ({RANKS_FILE} and {META_FILE} are expected there). "
            "Run `autoresearch prepare` for this profile and source first."
        )
    text = ranks_path.read_text()
    meta = json.loads(meta_path.read_text())
    if hashlib.sha256(text.encode()).hexdigest() != meta["ranks_sha256"]:
        raise HarnessError(
            f"{ranks_path} does not match the checksum in {meta_path}: the tokenizer was changed or "
            "damaged after it was made. Delete the folder and run `autoresearch prepare` again."
        )
    if expected_vocab_size is not None and meta["vocab_size"] != expected_vocab_size:
        raise HarnessError(
            f"The tokenizer in {directory} has {meta['vocab_size']} tokens but the profile needs "
            f"{expected_vocab_size}: it was built for another profile. Run `autoresearch prepare "
            "--profile NAME` with the profile you train with."
        )
    ranks = {}
    for line in text.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    encoding = tiktoken.Encoding(
        name=f"autoresearch-{meta['vocab_size']}",
        pat_str=meta["pattern"],
        mergeable_ranks=ranks,
        special_tokens=meta["special_tokens"],
    )
    # The identity covers what encoding depends on besides the merges: the pattern and special tokens.
    identity = hashlib.sha256(json.dumps([meta["ranks_sha256"], meta["pattern"], meta["special_tokens"]],
                                         sort_keys=True).encode()).hexdigest()
    return Tokenizer(encoding, meta["vocab_size"], meta["special_tokens"][SPECIAL_TOKENS[0]], identity)
