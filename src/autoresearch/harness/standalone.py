"""A lab inside the trainer's own process, for `python train.py` run by hand with no lab around it.

It serves the same calls as the lab (harness.feed), from the prepared data that `autoresearch
prepare` made for the profile ($AUTORESEARCH_PROFILE, $AUTORESEARCH_DATA, $AUTORESEARCH_DEVICE and
$AUTORESEARCH_TIME_BUDGET override), writes the checkpoint to ./run_output/checkpoint.pt, scores it
with the harness's scorer and prints the summary. Handy for trying a change; not a measurement: the
trainer here could reach everything, and nothing is recorded.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

OUTPUT_DIR = Path("run_output")


def serve_in_process() -> socket.socket:
    """The trainer's end of a socket pair whose other end a thread of this process answers."""
    import torch

    from .dataset import PreparedData, current_data_dir
    from .feed import Feed, serve_trainer
    from .profiles import get_profile
    from .session import CHECKPOINT_FILE, default_device, default_profile_name

    env = os.environ
    device = torch.device(env.get("AUTORESEARCH_DEVICE") or default_device())
    profile = get_profile(env.get("AUTORESEARCH_PROFILE") or default_profile_name(device))
    data_dir = Path(env["AUTORESEARCH_DATA"]) if env.get("AUTORESEARCH_DATA") else current_data_dir(profile)
    data = PreparedData.open(data_dir, profile)
    feed = Feed(data.tokens("train"), data.doc_starts("train"), profile.seq_len, data.tokenizer.bos_id,
                profile.vocab_size)
    budget = float(env.get("AUTORESEARCH_TIME_BUDGET") or profile.time_budget)
    settings = {"profile": asdict(profile), "time_budget": budget, "bos_id": data.tokenizer.bos_id,
                "seed": int(env["AUTORESEARCH_SEED"]) if env.get("AUTORESEARCH_SEED") else None,
                "device": str(device), "tokenizer": str(data_dir)}
    trainer = Path(sys.modules["__main__"].__file__ or "train.py").resolve()
    launched = time.monotonic()  # start_run() was called: the summary's total_seconds counts from here

    def on_checkpoint(payload: bytes, stats: dict, arrived: float) -> None:
        OUTPUT_DIR.mkdir(exist_ok=True)
        path = OUTPUT_DIR / CHECKPOINT_FILE
        path.write_bytes(payload)
        training = arrived - feed.started_at if feed.started_at else None
        print(f"checkpoint written to {path}" + (f" after {training:.1f} s of training" if training else ""), flush=True)
        score(trainer, path, data, profile, device, training, feed.tokens_served, stats, launched)

    ours, theirs = socket.socketpair()
    threading.Thread(target=serve_trainer, args=(ours, feed, settings, on_checkpoint), daemon=True).start()
    return theirs


def score(trainer: Path, checkpoint: Path, data, profile, device, training: float | None, tokens: int,
          stats: dict, launched: float) -> None:
    from .hardware import peak_flops
    from .loader import eval_rows
    from .model_server import LocalModel, load_model
    from .scoring import TOLERANCE, Scorer, eval_batch_size

    started = time.time()
    model = LocalModel(load_model(trainer, checkpoint, device), device, profile.vocab_size)
    rows = eval_rows(data.tokens("val"), data.doc_starts("val"), profile.seq_len, data.tokenizer.bos_id,
                     profile.eval_rows)
    result = Scorer(rows, data.tokenizer.token_bytes(), eval_batch_size(device.type, profile.seq_len, profile.vocab_size),
                    TOLERANCE.get(device.type, 1e-3)).score(model)
    flops = stats.get("flops_per_token")
    peak = peak_flops(stats.get("device_name"))
    mfu = 100 * flops * tokens / training / peak if flops and peak and training else None
    params = sum(p.numel() for p in model.model.parameters())
    print(f"scored in {time.time() - started:.1f} s (run by hand: the lab's numbers come from `autoresearch trial`)")
    print("---")
    for key, value in [("val_bpb", f"{result.bpb:.6f}"), ("training_seconds", f"{training or 0:.1f}"),
                       ("total_seconds", f"{time.monotonic() - launched:.1f}"),
                       ("peak_vram_mb", f"{stats.get('peak_memory_mb', 0):.1f}"),
                       ("mfu_percent", f"{mfu:.2f}" if mfu is not None else "n/a"),
                       ("total_tokens_M", f"{tokens / 1e6:.1f}"), ("num_steps", f"{stats.get('num_steps', 'n/a')}"),
                       ("num_params_M", f"{params / 1e6:.1f}"), ("depth", f"{stats.get('depth', 'n/a')}")]:
        print(f"{key + ':':<18}{value}")
