"""Data-parallel train.py: the template's gradient all-reduce against DDP, step time on K ranks.

Runs the template's model, optimizer and loss (compiled on CUDA, as train.py runs it; the plain loss,
which DDP's forward can serve) on random tokens, one optimizer step of TOTAL_BATCH_SIZE tokens over
all ranks, three ways:
  none:      no gradient exchange at all, each rank alone (the floor: what communication costs above it)
  allreduce: train.py's sum_gradients, one all-reduce of all gradients laid end to end, after the
             backward passes
  ddp:       DistributedDataParallel, whose bucketed all-reduces overlap the last backward pass
At the reference configuration on CUDA (depth 8, vocab 8192, sequence 2048, 2^19 tokens a step, the
device batch 128 or what K ranks can share), at the cpu profile's on the CPU (gloo).

    torchrun --standalone --nproc-per-node=K bench/bench_distributed.py [--steps 15 --warmup 4]
"""
import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

TEMPLATE = Path(__file__).resolve().parent.parent / "src" / "autoresearch" / "templates" / "train.py"


def load_template():
    spec = importlib.util.spec_from_file_location("train_bench", TEMPLATE)
    t = importlib.util.module_from_spec(spec)
    sys.modules["train_bench"] = t  # torch.compile looks module globals up by module name
    spec.loader.exec_module(t)
    return t


def measure(t, method, device, shape, steps, warmup):
    """Median and min seconds of one optimizer step, synchronised across the ranks."""
    V, T, B, grad_accum = shape
    world = dist.get_world_size()
    torch.manual_seed(0)
    with torch.device(device):
        model = t.build_model(t.model_config(V, T))
    optimizer = t.setup_optimizer(model)
    autocast, kernels, _ = t.setup_device(model, device)
    wrapped = DistributedDataParallel(model) if method == "ddp" else model
    loss_fn = t.make_loss_fn(wrapped, compiled=device.type == "cuda", fused=False)
    pool = [torch.randint(0, V, (B, T + 1), device=device) for _ in range(4)]
    times = []
    with kernels:
        for step in range(warmup + steps):
            dist.barrier()
            t0 = time.perf_counter()
            for micro in range(grad_accum):
                rows = pool[(step + micro) % 4]
                last = micro == grad_accum - 1
                with wrapped.no_sync() if method == "ddp" and not last else contextlib.nullcontext(), autocast:
                    loss = loss_fn(rows[:, :-1], rows[:, 1:])
                (loss / (grad_accum * world)).backward()
            if method == "allreduce":
                t.sum_gradients(model)
            optimizer.step()
            model.zero_grad(set_to_none=True)
            loss.item()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    timed = torch.tensor(times[warmup:], dtype=torch.float64, device=device)
    dist.all_reduce(timed, op=dist.ReduceOp.MAX)  # a step takes as long as its slowest rank
    return statistics.median(timed.tolist()), min(timed.tolist())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=15, help="timed optimizer steps per method")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps first (compilation)")
    ap.add_argument("--methods", default="none,allreduce,ddp")
    ap.add_argument("--json", default="", help="rank 0 writes the results here")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    world = dist.get_world_size()
    t = load_template()
    from autoresearch.harness import hardware, profiles

    profile = profiles.get_profile("h100" if cuda else "cpu")
    for constant, value in profile.trainer.items():
        setattr(t, constant, value)
    T, V = profile.seq_len, profile.vocab_size
    B = min(t.DEVICE_BATCH_SIZE, t.TOTAL_BATCH_SIZE // (T * world))
    grad_accum = t.TOTAL_BATCH_SIZE // (B * T * world)
    results = []
    for method in args.methods.split(","):
        median, fastest = measure(t, method, device, (V, T, B, grad_accum), args.steps, args.warmup)
        results.append(dict(method=method, ranks=world, device=hardware.device_name(device), device_batch=B,
                            grad_accum=grad_accum, step_ms_median=round(1000 * median, 1),
                            step_ms_min=round(1000 * fastest, 1), tokens_per_s=round(t.TOTAL_BATCH_SIZE / median)))
        if dist.get_rank() == 0:
            print(json.dumps(results[-1]), flush=True)
    if dist.get_rank() == 0 and args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
