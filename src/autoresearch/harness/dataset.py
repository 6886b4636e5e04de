"""Prepared data: a source tokenized once, ahead of training, into flat token files.

Each split is `SPLIT.bin` (uint16 tokens, every document prefixed with BOS) and `SPLIT.docs.npy`
(the start of every document). `manifest.json` is written last, so a folder without it is an
unfinished preparation and is never read.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import tokenizer as tokenizer_lib
from .errors import HarnessError
from .profiles import MIN_VAL_TOKENS, Profile
from .sources import SPLITS, CorpusSource, read_documents, read_shards
from .storage import atomic_path, cache_dir, ensure_writable_dir, sha256_file, write_json

FORMAT_VERSION = 1
TOKEN_DTYPE = np.uint16  # every profile's vocabulary fits
ENCODE_BATCH = 512  # documents per tiktoken call: large enough for its threads, small for memory


def prepared_dir(source_id: str, vocab_size: int, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "prepared" / f"{source_id}-v{vocab_size}"


def current_data_pointer(profile: Profile, cache: Path | None = None) -> Path:
    """The file in which `prepare` notes the data it last made for a profile."""
    return (cache or cache_dir()) / "prepared" / f"current-{profile.name}.json"


def remember_current(profile: Profile, data_dir: Path, cache: Path | None = None) -> None:
    write_json(current_data_pointer(profile, cache), {"data": str(data_dir)})


def current_data_dir(profile: Profile) -> Path:
    pointer = current_data_pointer(profile)
    if not pointer.is_file():
        raise HarnessError(
            f"No data has been prepared for profile {profile.name!r} (looked for {pointer}). Run "
            f"`autoresearch prepare --profile {profile.name}` first, or set AUTORESEARCH_DATA to a "
            "prepared data folder."
        )
    return Path(json.loads(pointer.read_text())["data"])


@dataclass
class PreparedData:
    path: Path
    manifest: dict
    tokenizer: tokenizer_lib.Tokenizer

    @classmethod
    def open(cls, path: Path, profile: Profile) -> "PreparedData":
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise HarnessError(
                f"No prepared data in {path}. Run `autoresearch prepare --profile {profile.name}` "
                "(add --source for a corpus other than the profile's default) first."
            )
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT_VERSION:
            raise HarnessError(
                f"{path} was prepared by another version of autoresearch (format "
                f"{manifest.get('format')}, this one reads {FORMAT_VERSION}). Delete it and run "
                "`autoresearch prepare` again."
            )
        tok = tokenizer_lib.load(path, expected_vocab_size=profile.vocab_size)
        data = cls(path, manifest, tok)
        if data.split_tokens("val") < MIN_VAL_TOKENS:
            raise HarnessError(
                f"The val split in {path} holds {data.split_tokens('val'):,} tokens, fewer than the "
                f"{MIN_VAL_TOKENS:,} needed for a measurement worth deciding on. Give the corpus a "
                "larger val split."
            )
        return data

    def split_tokens(self, split: str) -> int:
        return self.manifest["splits"].get(split, {}).get("tokens", 0)

    def has_split(self, split: str) -> bool:
        return self.split_tokens(split) > 0

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens, memory-mapped (not read into RAM)."""
        if not self.has_split(split):
            raise HarnessError(f"The prepared data in {self.path} has no {split} split.")
        return np.memmap(self.path / f"{split}.bin", dtype=TOKEN_DTYPE, mode="r")

    def doc_starts(self, split: str) -> np.ndarray:
        return np.load(self.path / f"{split}.docs.npy")

    def fingerprint(self) -> dict:
        """What identifies this data: any change to it makes measurements incomparable."""
        return {
            "source": self.manifest["source"],
            "vocab_size": self.tokenizer.vocab_size,
            "tokenizer_sha256": self.tokenizer.sha256,
            "splits_sha256": {s: v["sha256"] for s, v in self.manifest["splits"].items()},
        }


def prepare(source: CorpusSource, profile: Profile, *, cache: Path | None = None,
            progress: bool = True) -> tuple[PreparedData, bool]:
    """Train the tokenizer and tokenize every split of `source`; returns (data, whether work was done).

    Idempotent: a folder with a manifest is complete and is opened as it is.
    """
    out = prepared_dir(source.id, profile.vocab_size, cache)
    if (out / "manifest.json").is_file():
        data = PreparedData.open(out, profile)
        remember_current(profile, out, cache)
        return data, False
    files = {split: source.files(split) for split in SPLITS}  # one listing: every step sees the same files
    for split in ("train", "val"):  # before hours of work, not after
        if not files[split]:
            raise source.missing_split_error(split)
    ensure_writable_dir(out)
    started = time.time()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)

    if (out / tokenizer_lib.META_FILE).is_file():
        tok = tokenizer_lib.load(out, expected_vocab_size=profile.vocab_size)
        say(f"tokenizer: reusing {out / tokenizer_lib.RANKS_FILE}")
    else:
        say(f"tokenizer: training a {profile.vocab_size}-token BPE on the train split of {source.id} ...")
        t0 = time.time()
        train_files = ", ".join(str(p) for p in files["train"])
        tok = tokenizer_lib.train(read_shards(files["train"]), profile.vocab_size, out,
                                  what=f"The train split of {source.id} ({train_files})")
        say(f"tokenizer: done in {time.time() - t0:.1f}s")

    splits = {}
    for split in SPLITS:
        if not files[split]:  # only test may be missing (checked above)
            continue
        splits[split] = _tokenize_split(source, split, files[split], tok, out, progress)
        if split == "val" and splits[split]["tokens"] < MIN_VAL_TOKENS:
            raise HarnessError(
                f"The val split of {source.id} ({', '.join(str(p) for p in files[split])}) "
                f"tokenizes to {splits[split]['tokens']:,} tokens, fewer than the {MIN_VAL_TOKENS:,} a "
                "measurement needs. Use a corpus with a larger val split."
            )
    manifest = {
        "format": FORMAT_VERSION,
        "source": source.id,
        "description": source.description,
        "vocab_size": tok.vocab_size,
        "tokenizer_sha256": tok.sha256,
        "splits": splits,
        "seconds": round(time.time() - started, 1),
    }
    write_json(out / "manifest.json", manifest)
    remember_current(profile, out, cache)
    return PreparedData.open(out, profile), True


def _tokenize_split(source: CorpusSource, split: str, files: list[Path], tok, out: Path, progress: bool) -> dict:
    from tqdm import tqdm

    bar = tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True,
               desc=f"tokenize {split}", disable=not progress, file=sys.stderr)
    starts: list[int] = []
    n_tokens = 0
    with atomic_path(out / f"{split}.bin") as tmp, open(tmp, "wb") as sink:

        def write(batch: list[str]) -> None:
            nonlocal n_tokens
            for ids in tok.encode_batch(batch):
                doc = np.empty(len(ids) + 1, dtype=TOKEN_DTYPE)
                doc[0], doc[1:] = tok.bos_id, ids
                sink.write(doc.tobytes())
                starts.append(n_tokens)
                n_tokens += len(doc)

        for path in files:
            batch: list[str] = []
            for text in read_documents(path):
                batch.append(text)
                if len(batch) == ENCODE_BATCH:
                    write(batch)
                    batch = []
            write(batch)
            bar.update(path.stat().st_size)
    bar.close()
    if not starts:
        raise HarnessError(
            f"The {split} split of {source.id} holds no documents (its files: "
            f"{', '.join(str(p) for p in files)}). Every shard needs non-empty `text` rows."
        )
    with atomic_path(out / f"{split}.docs.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(starts, dtype=np.int64))
    return {"documents": len(starts), "tokens": n_tokens, "sha256": sha256_file(out / f"{split}.bin")}
