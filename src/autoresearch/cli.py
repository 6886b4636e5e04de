"""The `autoresearch` command. Thin: it parses arguments and calls the parts; nothing imports it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .harness import get_profile, prepare, resolve_source

    profile = get_profile(args.profile)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else None
    source = resolve_source(args.source or profile.default_source, cache=cache, num_shards=args.num_shards,
                            progress=not args.quiet)
    data, worked = prepare(source, profile, cache=cache, progress=not args.quiet)
    m = data.manifest
    print(("prepared" if worked else "already prepared (nothing to do)") + f": {data.path}")
    print(f"  profile   {profile.name}: seq_len {profile.seq_len}, budget {profile.time_budget:g}s, "
          f"vocab {profile.vocab_size}, eval cap {profile.eval_tokens:,} tokens")
    print(f"  source    {m['description']}")
    print(f"  tokenizer {data.tokenizer.vocab_size} tokens, sha256 {data.tokenizer.sha256[:12]}")
    for split in (s for s in ("train", "val", "test") if s in m["splits"]):
        info = m["splits"][split]
        note = ""
        if split == "val":
            evaluated = min(info["tokens"], profile.eval_tokens)
            note = f"  (evaluated: {evaluated:,} tokens{', the whole split' if evaluated == info['tokens'] else ''})"
        elif split == "test":
            note = "  (sealed: final reports only)"
        print(f"  {split:<9} {info['documents']:>8,} documents {info['tokens']:>13,} tokens{note}")
    if worked:
        print(f"  took      {m['seconds']:.1f}s")
    return 0


def _cmd_profiles(args: argparse.Namespace) -> int:
    from .harness import PROFILES

    for p in PROFILES.values():
        print(f"{p.name:<6} {p.description}")
        print(f"       seq_len {p.seq_len}, budget {p.time_budget:g}s, eval cap {p.eval_tokens:,} tokens, "
              f"vocab {p.vocab_size}, default source {p.default_source}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .harness import PROFILES

    parser = argparse.ArgumentParser(
        prog="autoresearch",
        description="Overnight ML research: a proposer edits train.py, the lab trains it for a fixed "
        "budget, measures val_bpb, keeps what helped and records everything.",
    )
    parser.add_argument("--version", action="version", version=f"autoresearch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "prepare",
        help="download (if needed), train the tokenizer and tokenize a corpus for a profile",
        description="Get a corpus ready for training: fetch it if it is remote, train the BPE tokenizer "
        "on its train split and tokenize train, val and test once, into the cache. Running it again "
        "does nothing.",
    )
    p.add_argument("--profile", default="cpu", choices=sorted(PROFILES),
                   help="compute profile whose sequence length and vocabulary to prepare for (default: cpu)")
    p.add_argument("--source", help="`default` (embedded, offline), `climbmix` (the reference's shards, "
                   "downloaded), or a directory of shards with train/ val/ [test/] subfolders "
                   "(default: the profile's own)")
    p.add_argument("--num-shards", type=int, help="climbmix training shards to download (default: 10)")
    p.add_argument("--cache-dir", help="where shards and prepared data live "
                   "(default: $AUTORESEARCH_CACHE or ~/.cache/autoresearch)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("profiles", help="list the compute profiles and their frozen constants")
    p.set_defaults(func=_cmd_profiles)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .harness import HarnessError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (HarnessError, ValueError) as e:
        print(f"autoresearch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoresearch: interrupted", file=sys.stderr)
        return 130
