"""Fixtures shared by the harness's specifications.

Every test runs with AUTORESEARCH_CACHE pointed at a fresh temporary folder and the other
variables the lab sets removed, so no test reads or writes ~/.cache or depends on the shell.
Expensive things (a trained tokenizer, prepared data) are made once per session, from small slices
of the offline corpus in ../shared/corpus or from the embedded default corpus.
"""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autoresearch.harness import PROFILES, Profile, prepare
from autoresearch.harness.sources import default_source, directory_source

RUN_VARIABLES = (
    "AUTORESEARCH_PROFILE", "AUTORESEARCH_DATA", "AUTORESEARCH_DEVICE", "AUTORESEARCH_OUTPUT",
    "AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_SEED", "AUTORESEARCH_EVENTS_FD", "XDG_CACHE_HOME",
)

# Rows taken from each split of the offline corpus for the small test corpus. 100 val rows
# tokenize to about 300k tokens at vocab 512, comfortably above MIN_VAL_TOKENS.
SLICE_ROWS = {"train": 300, "val": 100, "test": 40}


def shared_corpus_path() -> Path:
    override = os.environ.get("AUTORESEARCH_SHARED_CORPUS")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "corpus"


def write_parquet(path: Path, texts: list, column: str = "text", row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: pa.array(texts, type=pa.string())}), path, row_group_size=row_group_size)
    return path


@pytest.fixture
def write_shard():
    """`write_shard(path, texts, column="text", row_group_size=None)` writes a parquet shard."""
    return write_parquet


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch, tmp_path_factory):
    """A private cache per test, and none of the run variables a shell might have set."""
    for name in RUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    return cache


@pytest.fixture
def cache(isolated_environment) -> Path:
    """This test's AUTORESEARCH_CACHE."""
    return isolated_environment


@pytest.fixture(scope="session")
def shared_corpus() -> Path:
    path = shared_corpus_path()
    if not (path / "train").is_dir():
        pytest.skip(f"the offline corpus is not at {path} (set AUTORESEARCH_SHARED_CORPUS)")
    return path


@pytest.fixture(scope="session")
def corpus_texts(shared_corpus) -> dict[str, list[str]]:
    """The first rows of each split of the offline corpus (train from its first shard)."""
    texts = {}
    for split, n in SLICE_ROWS.items():
        pf = pq.ParquetFile(shared_corpus / split / "shard_00000.parquet")
        texts[split] = pf.read_row_group(0, columns=["text"]).column("text").to_pylist()[:n]
    return texts


@pytest.fixture(scope="session")
def tiny_profile() -> Profile:
    """A profile small enough for tests: vocab 512, rows of 64 tokens, 32 evaluation rows."""
    return Profile(name="tiny", description="for tests", seq_len=64, time_budget=5.0, eval_tokens=32 * 64,
                   vocab_size=512, default_source="default")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, corpus_texts) -> Path:
    """A corpus directory in the layout of ../shared/corpus: train/ (two shards), val/ and test/."""
    root = tmp_path_factory.mktemp("small_corpus")
    train = corpus_texts["train"]
    write_parquet(root / "train" / "shard_00000.parquet", train[: len(train) // 2])
    write_parquet(root / "train" / "shard_00001.parquet", train[len(train) // 2 :])
    write_parquet(root / "val" / "shard_00000.parquet", corpus_texts["val"])
    write_parquet(root / "test" / "shard_00000.parquet", corpus_texts["test"])
    return root


@pytest.fixture(scope="session")
def small_prepared(tmp_path_factory, small_corpus, tiny_profile):
    """`small_corpus` prepared for `tiny_profile` (a 512-token BPE), in a cache of its own."""
    data, worked = prepare(directory_source(small_corpus), tiny_profile, cache=tmp_path_factory.mktemp("cache"),
                           progress=False)
    assert worked
    return data


@pytest.fixture(scope="session")
def cpu_cache(tmp_path_factory) -> Path:
    """A cache holding the embedded default corpus prepared for the real `cpu` profile."""
    cache = tmp_path_factory.mktemp("cpu_cache")
    prepare(default_source(), PROFILES["cpu"], cache=cache, progress=False)
    return cache


@pytest.fixture(scope="session")
def cpu_prepared(cpu_cache):
    data, worked = prepare(default_source(), PROFILES["cpu"], cache=cpu_cache, progress=False)
    assert not worked
    return data


@pytest.fixture(scope="session")
def research_workspace(tmp_path_factory, cpu_prepared) -> Path:
    """A real small workspace: baseline, a kept, a discarded and a crashed candidate (report_helpers)."""
    from report_helpers import build_research_workspace

    return build_research_workspace(tmp_path_factory.mktemp("research") / "ws", cpu_prepared)


@pytest.fixture
def workspace_copy(research_workspace, tmp_path) -> Path:
    """A copy of `research_workspace` to change freely."""
    from report_helpers import copy_workspace

    return copy_workspace(research_workspace, tmp_path / "ws")
