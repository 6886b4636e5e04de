"""Scoring a trial's checkpoint in a process of its own: the number the lab decides on.

    python -m autoresearch.harness.evaluate TRAINER CHECKPOINT OUT_JSON [--split val|test]

The model is rebuilt through the trainer's `build_model(config)`, its weights loaded from the
checkpoint, and scored from its logits by harness code. A causality probe runs first: changing
the tokens after a position must not change the logits before it, or the model is reading the
answers. Profile, data and device come from the same environment variables as `start_run`.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import metric
from .errors import HarnessError
from .session import Run, start_run
from .storage import write_json

LOGITS_BYTES = {"cuda": 2 * 2**30, "mps": 2**30, "cpu": 2**28}  # memory for one batch of fp32 logits


def load_trainer(path: Path):
    """Import the trainer script as a module (its training sits behind `__name__ == "__main__"`)."""
    spec = importlib.util.spec_from_file_location("trainer_under_evaluation", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise HarnessError(f"Importing {path} for evaluation failed: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, "build_model", None)):
        raise HarnessError(
            f"{path} defines no build_model(config). The harness rebuilds the trained model through it "
            "to score the checkpoint; keep that function in train.py."
        )
    return module


def eval_batch_size(run: Run) -> int:
    per_row = run.seq_len * run.vocab_size * 4
    size = 1
    while size * 2 * per_row <= LOGITS_BYTES.get(run.device.type, 2**28):
        size *= 2
    return size


@torch.no_grad()
def causality_probe(model: torch.nn.Module, rows: torch.Tensor, device: torch.device, vocab_size: int) -> dict:
    """Randomise every row's tokens from a cut onwards and compare the logits before the cut."""
    inputs = rows[:, :-1].to(device, dtype=torch.int64)
    batch, seq = inputs.shape
    cuts = torch.linspace(seq // 8, seq - 1, batch).long().tolist()
    changed = inputs.clone()
    gen = torch.Generator().manual_seed(1234)
    for i, cut in enumerate(cuts):
        changed[i, cut:] = torch.randint(0, vocab_size, (seq - cut,), generator=gen).to(device)
    model.eval()
    with metric.scoring_autocast(device):
        a, b = model(inputs).float(), model(changed).float()
    tolerance = 1e-3 if device.type == "cuda" else 1e-5
    worst, worst_at = 0.0, None
    for i, cut in enumerate(cuts):
        scale = max(1.0, a[i, :cut].abs().max().item())
        diff = (a[i, :cut] - b[i, :cut]).abs().max().item() / scale
        if diff > worst:
            worst, worst_at = diff, cut
    return {"causal": worst <= tolerance, "max_relative_diff": worst, "tolerance": tolerance, "cut": worst_at}


def hardware(device: torch.device) -> dict:
    info = {"device": device.type, "torch": torch.__version__, "python": sys.version.split()[0]}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            info["driver"] = None
    else:
        import platform

        info["cpu"] = platform.processor() or platform.machine()
    return info


def evaluate_checkpoint(trainer: Path, checkpoint: Path, split: str = "val") -> dict:
    started = time.time()
    # The trainer's module code runs below; keep our own references to what scores it, so that an
    # import that patches them is caught rather than believed.
    scorers = (metric.evaluate_bpb, F.cross_entropy, torch.Tensor.sum)
    run = start_run()
    module = load_trainer(trainer)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise HarnessError(f"The trainer wrote no checkpoint at {checkpoint}: it must end with run.save_checkpoint(...).") from None
    except Exception as e:
        raise HarnessError(f"The checkpoint {checkpoint} cannot be read safely ({e}).") from None
    model = module.build_model(state["config"])
    missing, unexpected = model.load_state_dict(state["state_dict"], strict=False)
    if missing or unexpected:
        raise HarnessError(
            f"The checkpoint does not fit build_model(config): missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}. build_model must rebuild exactly the model that was trained."
        )
    model.to(run.device)
    batch = eval_batch_size(run)
    rows = run.eval_rows(split)
    probe = causality_probe(model, rows[:batch], run.device, run.vocab_size)
    result = {"split": split, "causality": probe, "hardware": hardware(run.device), "eval_batch_size": batch,
              "eval_tokens": int(rows[:, 1:].numel()), "val_bpb": None}
    if probe["causal"]:
        result["val_bpb"] = scorers[0](model, rows, run.token_bytes(), batch, run.device)
    if (metric.evaluate_bpb, F.cross_entropy, torch.Tensor.sum) != scorers:
        raise HarnessError("The trainer replaced functions the harness scores with; the measurement is void.")
    result["seconds"] = round(time.time() - started, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m autoresearch.harness.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trainer", type=Path)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--split", default="val", choices=("val", "test"))
    args = ap.parse_args(argv)
    try:
        result = evaluate_checkpoint(args.trainer, args.checkpoint, args.split)
    except HarnessError as e:
        write_json(args.out, {"error": str(e)})
        print(f"evaluation failed: {e}", file=sys.stderr)
        return 1
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
