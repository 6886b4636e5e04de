"""The reference's corpus: climbmix-400b-shuffle shards, fetched into the cache on demand."""
from __future__ import annotations

from pathlib import Path

from . import download
from .sources import CorpusSource
from .storage import cache_dir, ensure_writable_dir

DEFAULT_NUM_SHARDS = 10  # the reference's default for `prepare`
TEST_SHARD = download.CLIMBMIX_VAL_SHARD - 1  # sealed: read only for final reports


def source(cache: Path | None = None, num_shards: int | None = None, progress: bool = True) -> CorpusSource:
    num_shards = DEFAULT_NUM_SHARDS if num_shards is None else num_shards
    if not 1 <= num_shards <= TEST_SHARD:
        raise ValueError(f"--num-shards must be between 1 and {TEST_SHARD}, got {num_shards}")
    shard_dir = ensure_writable_dir((cache or cache_dir()) / "shards" / "climbmix")
    indices = {"train": list(range(num_shards)), "val": [download.CLIMBMIX_VAL_SHARD], "test": [TEST_SHARD]}
    paths = download.download_shards(
        indices["train"] + indices["val"] + indices["test"], shard_dir, progress=progress
    )
    by_index = dict(zip(indices["train"] + indices["val"] + indices["test"], paths))
    return CorpusSource(
        # The id names the training shard count: a prepared set of 10 shards is not one of 20.
        id=f"climbmix-{num_shards}",
        description=f"climbmix-400b-shuffle, {num_shards} training shard(s) from {download.resolve_endpoint()}",
        files=lambda split: [by_index[i] for i in indices[split]],
    )
