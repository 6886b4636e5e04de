"""GPU benchmark of the train.py template: training throughput, MFU, peak memory, compile time.

Runs the template's own model, optimizer and step (compiled, bf16, the attention kernels it picks) at
the reference configuration (depth 8, vocab 8192, sequence 2048, 2^19 tokens per step, device batch
128) on random tokens, or on prepared data with --data. Each variant runs in a process of its own
with an empty Inductor cache: the cache ignores the SDPA backend flags, and compile time is measured
cold.

    PYTHONPATH=src python bench/bench_train_gpu.py                    # the quick variants
    PYTHONPATH=src python bench/bench_train_gpu.py --variants ref,L --steps 30 --json out.json

Variants: ref (the template as shipped: SSSL; on Hopper with nvidia-cudnn-frontend, every layer on
cuDNN's fused attention; on CUDA, the harness's fused soft-capped cross-entropy), flex (train.py's
fallback without the frontend: cuDNN SDPA for full layers, FlexAttention for the sliding windows),
plain-loss (the loss written in PyTorch, as train.py runs it without Triton), ref-warm (ref again on
the compile cache ref left), L (every layer full-causal), the fallback's two with PyTorch's default
SDPA backend order (-default-sdpa), ref-b64 (device batch 64, 4 accumulation steps), ref-cdt (Inductor's coordinate-descent tuning), ma (Inductor's
max-autotune: Triton GEMMs with fused epilogues) and flex-autotune (the fallback, with max-autotune
of FlexAttention's kernels alone), which compile for minutes; cudagraphs (Inductor's CUDA graphs, as
mode="reduce-overhead"), fast-math and two-pass-softmax (Inductor options for the fused
elementwise kernels), no-prologue-fusion (the fallback, with RoPE and QK-norm kept out of
FlexAttention's kernel), regional (each block compiled on its own, the rest eager: a shorter compile).
These last eight run only when named. --template measures
another train.py, such as an older one, side by side. --profile prints a CUDA kernel table of one
step.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "src" / "autoresearch" / "templates" / "train.py"
# cudnn: SDPA's cuDNN backend first, as train.py sets it; frontend=False: train.py as on a machine without
# nvidia-cudnn-frontend, which serves attention through SDPA and FlexAttention.
VARIANTS = {
    "ref": dict(overrides={}, cudnn=True),
    "flex": dict(overrides={}, cudnn=True, frontend=False),
    "plain-loss": dict(overrides={}, cudnn=True, fused_loss=False),
    "L": dict(overrides={"WINDOW_PATTERN": "L"}, cudnn=True),
    "ref-default-sdpa": dict(overrides={}, cudnn=False, frontend=False),
    "L-default-sdpa": dict(overrides={"WINDOW_PATTERN": "L"}, cudnn=False, frontend=False),
    "ref-b64": dict(overrides={"DEVICE_BATCH_SIZE": 64}, cudnn=True),
    "ref-cdt": dict(overrides={}, cudnn=True, inductor={"coordinate_descent_tuning": True}),
    "ref-warm": dict(overrides={}, cudnn=True, cache_from="ref"),
    # Regional compilation: each block compiled on its own (one graph serves every block of a kind), the
    # embedding, the final norm and the fused loss eager: what it saves of the compile, what it costs a step.
    "regional": dict(overrides={}, cudnn=True, regional=True),
    "ma": dict(overrides={}, cudnn=True, inductor={"max_autotune": True}),
    # max-autotune with cuBLAS as the only GEMM: only FlexAttention's kernel configurations are tuned.
    "flex-autotune": dict(overrides={}, cudnn=True, frontend=False,
                          inductor={"max_autotune": True, "max_autotune_gemm_backends": "ATEN"}),
    "cudagraphs": dict(overrides={}, cudnn=True, inductor={"triton.cudagraphs": True}, cudagraphs=True),  # mode="reduce-overhead"
    "fast-math": dict(overrides={}, cudnn=True, inductor={"use_fast_math": True}),
    "two-pass-softmax": dict(overrides={}, cudnn=True, inductor={"online_softmax": False}),
    # RoPE and QK-norm stay out of FlexAttention's kernel instead of being recomputed in its prologue.
    "no-prologue-fusion": dict(overrides={}, cudnn=True, frontend=False, inductor={"prologue_fusion": False}),
}
PROFILE_MARK = "CUDA kernels of one step:\n"
NAMED_ONLY = ("regional", "ref-cdt", "ma", "flex-autotune", "cudagraphs", "fast-math", "two-pass-softmax", "no-prologue-fusion")


def load_template(overrides=None, path=None, name="train_bench"):
    """A train.py as module `name`: `path`, else $BENCH_TEMPLATE, else the shipped one; with
    `overrides` (constant -> value) set on it."""
    spec = importlib.util.spec_from_file_location(name, path or os.environ.get("BENCH_TEMPLATE", TEMPLATE))
    t = importlib.util.module_from_spec(spec)
    sys.modules[name] = t  # torch.compile looks module globals up by module name
    spec.loader.exec_module(t)
    for constant, value in (overrides or {}).items():
        assert hasattr(t, constant), constant
        setattr(t, constant, value)
    return t


def make_loss_fn(t, model, device, fused=True, compiled=True):
    """The training loss as train.py makes it: compiled, and with the harness's fused soft-capped
    cross-entropy where train.py takes it, unless `fused` is False. Older templates have no fused loss."""
    import inspect

    if "fused" not in inspect.signature(t.make_loss_fn).parameters:
        return t.make_loss_fn(model, compiled)
    return t.make_loss_fn(model, compiled, fused and compiled and t.softcap_loss.available(device))


def run_one(name, steps, warmup, data, profile_rows=0):
    import torch
    import torch._inductor.config
    import torch.nn.functional as F

    variant = VARIANTS[name]
    t = load_template(variant["overrides"])
    for key, value in variant.get("inductor", {}).items():
        torch._inductor.config.patch({key: value}).__enter__()
    device = torch.device("cuda")
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    T, V = 2048, 8192
    B = t.DEVICE_BATCH_SIZE
    grad_accum = t.TOTAL_BATCH_SIZE // (B * T)
    cfg = t.model_config(V, T)
    with torch.device(device):
        model = t.build_model(cfg)
    flops, flops_exact = t.flops_per_token(model), t.flops_per_token(model, exact=True)
    from autoresearch.harness.hardware import peak_flops

    peak = peak_flops(torch.cuda.get_device_name(device))  # the harness's table (older templates had their own)
    opt = t.setup_optimizer(model)
    if not variant.get("frontend", True) and hasattr(t, "cudnn_attention"):  # older templates lack it
        t.cudnn_attention = types.SimpleNamespace(available=lambda device: False)
    autocast, kernels, paths = t.setup_device(model, device)
    if not variant["cudnn"]:
        kernels, paths = contextlib.nullcontext(), paths.replace("sdpa(cudnn)", "sdpa")
    if variant.get("regional"):
        loss_fn = t.make_loss_fn(model, False, t.softcap_loss.available(device))  # the shipped template's
        for block in model.blocks:
            block.compile(dynamic=False)
    else:
        loss_fn = make_loss_fn(t, model, device, variant.get("fused_loss", True))

    if data:
        from autoresearch import harness

        os.environ["AUTORESEARCH_DATA"] = data
        os.environ["AUTORESEARCH_PROFILE"] = "h100"
        loader = harness.start_run().train_loader(B, 42)
        batches = (b[:2] for b in loader)
    else:
        pool = [torch.randint(0, V, (B, T + 1), device=device) for _ in range(4)]
        batches = ((r[:, :-1], r[:, 1:]) for i in range(10**9) for r in [pool[i % 4]])

    # Same function on every path: compiled (cuDNN/flex) against eager (SDPA with explicit masks).
    kernels.__enter__()  # a one-shot context manager: entered once, for the whole benchmark
    x, y = next(batches)
    with autocast, torch.no_grad():
        eager = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    torch.cuda.reset_peak_memory_stats()  # the eager check above is no part of training
    times, opt_times = [], []
    t_first = time.perf_counter()

    def forward_backward():
        """One optimizer step's gradient accumulation; the micro-batches' losses."""
        nonlocal x, y
        losses = []
        for _ in range(grad_accum):
            if variant.get("cudagraphs"):
                torch.compiler.cudagraph_mark_step_begin()  # each micro-batch a new replay
            with autocast:
                loss = loss_fn(x, y)
            (loss / grad_accum).backward()
            losses.append(loss.detach().clone())  # a CUDA graph's output is overwritten by its next replay
            x, y = next(batches)
        return losses

    def optimizer_step(step):
        for group in opt.param_groups:
            if group["kind"] == "muon":
                group["momentum"], group["weight_decay"] = t.muon_momentum(step), t.WEIGHT_DECAY
        opt.step()
        model.zero_grad(set_to_none=True)

    for step in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = forward_backward()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        optimizer_step(step)
        loss_f = losses[-1].item()
        t2 = time.perf_counter()
        times.append(t2 - t0)
        opt_times.append(t2 - t1)
        if step == 0:
            compiled_first = losses[0].item()
            first_fwd_bwd_s, first_step_s, first_optimizer_s = t1 - t_first, t2 - t_first, t2 - t1
            from torch._dynamo.utils import compile_times

            print(compile_times(repr="str"), file=sys.stderr, flush=True)
    if profile_rows:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            forward_backward()
            optimizer_step(warmup + steps)
            torch.cuda.synchronize()
            profiled_ms = 1000 * (time.perf_counter() - t0)
        averages = prof.key_averages()
        table = averages.table(sort_by="cuda_time_total", row_limit=profile_rows, max_name_column_width=110)
        kernel_ms = sum(e.self_device_time_total for e in averages) / 1000
        print(PROFILE_MARK + table + f"\n{kernel_ms:.1f} ms of kernels in a {profiled_ms:.1f} ms step (the GPU idles "
              f"{profiled_ms - kernel_ms:.1f} ms)", file=sys.stderr, flush=True)
    warm_s = sum(times[:warmup])
    timed, timed_opt = times[warmup:], opt_times[warmup:]
    med = statistics.median(timed)
    # Evaluation cost (eager, as the harness runs it): one batch of 32 rows.
    model.eval()
    with autocast, torch.no_grad():
        xe = x[:32]
        model(xe)
        torch.cuda.synchronize()
        te = time.perf_counter()
        for _ in range(3):
            model(xe)
        torch.cuda.synchronize()
        eval_ms = (time.perf_counter() - te) / 3 * 1000
    tok_s = t.TOTAL_BATCH_SIZE / med
    return dict(
        variant=name, attention=paths, device=torch.cuda.get_device_name(device), torch=torch.__version__,
        window_pattern=t.WINDOW_PATTERN, device_batch=B, grad_accum=grad_accum, data="corpus" if data else "random",
        params_M=round(sum(p.numel() for p in model.parameters()) / 1e6, 2), flops_per_token=flops,
        flops_per_token_exact=flops_exact, first_step_s=round(first_step_s, 1), first_fwd_bwd_s=round(first_fwd_bwd_s, 1),
        first_optimizer_s=round(first_optimizer_s, 1), warmup_steps_s=round(warm_s, 1),
        step_ms_median=round(1000 * med, 1), step_ms_min=round(1000 * min(timed), 1), step_ms_max=round(1000 * max(timed), 1),
        optimizer_ms_median=round(1000 * statistics.median(timed_opt), 1),
        tokens_per_s=round(tok_s), mfu_percent=round(100 * flops * tok_s / peak, 2) if peak else 0.0,
        mfu_exact_percent=round(100 * flops_exact * tok_s / peak, 2) if peak else 0.0,
        peak_alloc_GB=round(torch.cuda.max_memory_allocated() / 1e9, 2),
        peak_reserved_GB=round(torch.cuda.max_memory_reserved() / 1e9, 2),
        loss_eager_first=round(eager, 4), loss_compiled_first=round(compiled_first, 4), loss_last=round(loss_f, 4),
        eval_ms_per_32_rows=round(eval_ms, 1),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    quick = [name for name in VARIANTS if name not in NAMED_ONLY]
    ap.add_argument("--variants", default=",".join(quick))
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation)")
    ap.add_argument("--data", default="", help="prepared h100 data folder (default: random tokens)")
    ap.add_argument("--template", default=str(TEMPLATE), help="the train.py to measure (default: the shipped one)")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--profile", action="store_true", help="print a CUDA kernel profile of one step")
    ap.add_argument("--profile-rows", type=int, default=60, help="kernels in that profile, the slowest first")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed to each variant's process")
    ap.add_argument("--logs", default="", help="keep each variant's stdout and stderr in this folder")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        rows = args.profile_rows if args.profile else 0
        print("RESULT " + json.dumps(run_one(args.one, args.steps, args.warmup, args.data, rows)), flush=True)
        return
    results, caches = [], {}
    for name in args.variants.split(","):
        # A cold Inductor cache per variant, except for "-warm" variants, which reuse another's.
        source = VARIANTS[name].get("cache_from")
        cache = caches[source] if source else tempfile.mkdtemp(prefix=f"inductor-{name}-")
        caches[name] = cache
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "BENCH_TEMPLATE": args.template}
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--data", args.data] + (["--profile", "--profile-rows", str(args.profile_rows)] if args.profile else [])
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired as e:
            print(f"{name}: timed out after {args.timeout:g} s\n{(e.stdout or b'')[-3000:]}", flush=True)
            continue
        if args.logs:
            Path(args.logs).mkdir(parents=True, exist_ok=True)
            Path(args.logs, f"{name}.out").write_text(proc.stdout)
            Path(args.logs, f"{name}.err").write_text(proc.stderr)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{name}: FAILED (exit {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}", flush=True)
            continue
        if args.profile:
            print(proc.stderr[proc.stderr.find(PROFILE_MARK):], flush=True)
        r = json.loads(lines[-1][7:])
        r["process_s"] = round(time.time() - t0, 1)
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    cols = ["variant", "attention", "step_ms_median", "step_ms_min", "tokens_per_s", "mfu_percent", "mfu_exact_percent",
            "optimizer_ms_median", "peak_alloc_GB", "first_step_s", "first_fwd_bwd_s", "first_optimizer_s", "warmup_steps_s",
            "process_s", "loss_eager_first", "loss_compiled_first"]
    print("\n" + " | ".join(cols))
    for r in results:
        print(" | ".join(str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
