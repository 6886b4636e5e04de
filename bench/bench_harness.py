"""Harness benchmarks on this machine's CPU: `prepare` of a whole corpus, and the lab's feed of packed rows alone.

    python bench/bench_harness.py [--corpus ../shared/corpus] [--profile h100]

Prints one line per figure; BENCHMARKS.md records them with the machine and versions.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow
import tiktoken
import torch

from autoresearch.harness import get_profile, prepare, resolve_source
from autoresearch.harness.feed import Feed
from autoresearch.harness.loader import eval_rows


def main() -> None:
    default_corpus = Path(__file__).resolve().parents[2] / "shared" / "corpus"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(default_corpus))
    ap.add_argument("--profile", default="h100")
    ap.add_argument("--batches", type=int, default=50, help="loader batches to time")
    args = ap.parse_args()
    profile = get_profile(args.profile)
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}, numpy {np.__version__}, pyarrow {pyarrow.__version__}, tiktoken {tiktoken.__version__}")

    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        source = resolve_source(args.corpus)
        data, _ = prepare(source, profile, cache=Path(cache), progress=False)
        total = time.perf_counter() - t0
        m = data.manifest
        parquet_mb = sum(p.stat().st_size for s in ("train", "val", "test") for p in source.files(s)) / 1e6
        print(f"prepare  profile={profile.name} vocab={profile.vocab_size} seconds={total:.1f} "
              f"train_tokens={m['splits']['train']['tokens']:,} val_tokens={m['splits']['val']['tokens']:,} "
              f"parquet_MB={parquet_mb:.1f}")

        tokens, starts = data.tokens("train"), data.doc_starts("train")
        batch = 524_288 // (2 * profile.seq_len)  # the reference's device batch: 2^19 tokens per 2 micro-steps
        feed = Feed(tokens, starts, profile.seq_len, data.tokenizer.bos_id, profile.vocab_size)
        feed.start()
        feed.rows(batch, seed=0)
        t0 = time.perf_counter()
        n = 0
        for _ in range(args.batches):
            rows, _, _ = feed.rows(batch, seed=0)
            n += rows.shape[0] * profile.seq_len
        rate = n / (time.perf_counter() - t0)
        print(f"feed     batch={batch}x{profile.seq_len} tokens_per_s={rate / 1e6:.1f}M "
              f"(x{rate / 2e6:.0f} the 2M tokens/s an H100 needs)")

        t0 = time.perf_counter()
        rows = eval_rows(data.tokens("val"), data.doc_starts("val"), profile.seq_len, data.tokenizer.bos_id,
                         profile.eval_rows)
        print(f"eval_rows rows={len(rows)} seconds={time.perf_counter() - t0:.3f}")


if __name__ == "__main__":
    sys.exit(main())
