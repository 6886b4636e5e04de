"""Component timings on a CUDA GPU, for choosing train.py's kernels one piece at a time.

Each piece runs forward and backward at the reference's shapes (a device batch of 128 rows of 2048
tokens, width 512, 4 heads of 128), alone, so that a choice costs seconds of compilation instead of
a whole model's. Run with an empty Inductor cache to see cold compile times:

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) PYTHONPATH=src python bench/bench_kernels_gpu.py --json out.json

Pieces (--only): attention (cuDNN full-causal through SDPA; cuDNN full-causal and windowed through
the frontend, as train.py runs them on Hopper; PyTorch's FlashAttention-2 full and windowed;
FlexAttention windowed with kernel options; windows stitched exactly from two causal cuDNN or
FlashAttention-2 calls), softcap (the head's soft-capped cross-entropy, tanh against the same
function through a sigmoid and against the harness's fused op), qkv (three projections against one
on the stacked weights, with RoPE and QK-norm after), rope (RoPE and QK-norm: written with slices and a cat, with roll as train.py
has it, and as a hand-written Triton kernel), mlp (ReLU squared, default compile against
max-autotune).
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from bench_train_gpu import load_template  # a script beside this one

from autoresearch.harness import cudnn_attention, softcap_loss

B, T, H, D, WIDTH, VOCAB, WINDOW = 128, 2048, 4, 128, 512, 8192, 1024
TRAIN = load_template({})  # the shipped train.py, for the pieces that are its own functions


def timed(fn, iters, warmup=3):
    """Median milliseconds of fn() over `iters` calls, after `warmup` calls (the first compiles)."""
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return dict(ms=round(statistics.median(times), 3), first_call_s=round(first_s, 1))


def fwd_bwd(forward, inputs, grads):
    """A closure running forward on `inputs` and backward from `grads`, clearing input gradients."""

    def run():
        for x in inputs:
            x.grad = None
        outs = forward(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, grads[: len(outs)])

    return run


def causal_attention(q, k, v, kernel):
    """Causal attention of (N, H, L, D) tensors, and each query's log-sum-exp of scores (N, H, L)."""
    if kernel == "cudnn":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, is_causal=True)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, is_causal=True)[:2]
    return out, lse.view(q.shape[:3])


def causal_attention_backward(dout, q, k, v, out, lse, kernel):
    """Gradients of causal attention for q, k and v, given the output and log-sum-exps to use."""
    L, lse = q.size(2), lse.contiguous()
    no_rng = torch.empty((), dtype=torch.long, device=q.device)  # no dropout, no RNG state
    if kernel == "cudnn":
        return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.unsqueeze(-1), no_rng, no_rng, None, None, None, L, L, 0.0, True)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, None, None, L, L, 0.0, True, no_rng, no_rng)


def split_blocks(x, window):  # (B, H, T, D) -> (B, T/window, window, H, D), a view
    return x.transpose(1, 2).unflatten(1, (x.size(2) // window, window))


def join_blocks(x):  # the inverse of split_blocks
    return x.flatten(1, 2).transpose(1, 2)


def kernel_layout(x):  # (B, n, W, H, ...) -> (B n, H, W, ...): each block a sequence of its own
    return x.flatten(0, 1).transpose(1, 2)


def block_layout(x, B):  # the inverse of kernel_layout
    return x.transpose(1, 2).unflatten(0, (B, -1))


class StitchedWindowAttention(torch.autograd.Function):
    """Sliding-window attention (a query sees itself and the `window` keys before it; window divides
    T), exactly, from two calls of an exact causal kernel. Cut the sequence into blocks of `window`:
    a query at offset a of block b sees its own block up to a (causal) and block b-1 from a on
    (causal once both blocks are reversed). The two partial softmaxes merge through their
    log-sum-exps; given the merged output and log-sum-exp, each part's backward gives its exact
    share of the gradient, as in ring attention. Measured against FlexAttention, not adopted."""

    @staticmethod
    def forward(ctx, q, k, v, window, kernel):
        B = q.size(0)
        qb, kb, vb = (split_blocks(x, window) for x in (q, k, v))
        own_out, own_lse = causal_attention(*(kernel_layout(x) for x in (qb, kb, vb)), kernel)
        prev_out, prev_lse = causal_attention(
            *(kernel_layout(x.flip(2)) for x in (qb[:, 1:], kb[:, :-1], vb[:, :-1])), kernel)
        own_out, own_lse = block_layout(own_out, B), block_layout(own_lse, B)
        prev_out, prev_lse = block_layout(prev_out, B).flip(2), block_layout(prev_lse, B).flip(2)
        lse = torch.logaddexp(own_lse[:, 1:], prev_lse)
        mixed = (own_out[:, 1:] * (own_lse[:, 1:] - lse).exp().unsqueeze(-1)
                 + prev_out * (prev_lse - lse).exp().unsqueeze(-1))
        out = torch.cat([own_out[:, :1], mixed.to(q.dtype)], dim=1)
        lse = torch.cat([own_lse[:, :1], lse], dim=1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window, ctx.kernel = window, kernel
        return join_blocks(out)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        B = q.size(0)
        qb, kb, vb, db = (split_blocks(x, ctx.window) for x in (q, k, v, dout))
        own = causal_attention_backward(*(kernel_layout(x) for x in (db, qb, kb, vb, out, lse)), ctx.kernel)
        prev = causal_attention_backward(*(kernel_layout(x.flip(2)) for x in (
            db[:, 1:], qb[:, 1:], kb[:, :-1], vb[:, :-1], out[:, 1:], lse[:, 1:])), ctx.kernel)
        (dq, dk, dv), (pq, pk, pv) = (block_layout(g, B) for g in own), (block_layout(g, B).flip(2) for g in prev)
        dq = torch.cat([dq[:, :1], dq[:, 1:] + pq], dim=1)  # queries of block b also saw block b-1
        dk = torch.cat([dk[:, :-1] + pk, dk[:, -1:]], dim=1)  # keys of block b were also seen from b+1
        dv = torch.cat([dv[:, :-1] + pv, dv[:, -1:]], dim=1)
        return join_blocks(dq), join_blocks(dk), join_blocks(dv), None, None


def attention_pieces(iters):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
    dout = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)

    def cudnn_full(q, k, v):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)

    def flash(window):
        def run(q, k, v):  # (B, T, H, D) in and out; keys j with i - window <= j <= i
            return torch.ops.aten._flash_attention_forward(
                q, k, v, None, None, T, T, 0.0, True, False, window_size_left=window, window_size_right=0)[0]

        return run

    def stitched(kernel):  # StitchedWindowAttention over that causal kernel, compiled as train.py is
        def run(q, k, v):
            return StitchedWindowAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), WINDOW,
                                                 kernel).transpose(1, 2)

        return torch.compile(run, dynamic=False)

    mask = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (qi - ki <= WINDOW), None, None, T, T, device="cuda")

    def flex(options):
        def run(q, k, v):
            return flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                                  kernel_options=options or None).transpose(1, 2)

        return torch.compile(run, dynamic=False)

    def cudnn_band(window):  # cuDNN's diagonal band through the frontend, as train.py calls it on Hopper
        def run(q, k, v):
            return cudnn_attention.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             window).transpose(1, 2)

        return run

    pieces = {
        "cudnn full-causal": cudnn_full,
        "cudnn frontend full-causal": cudnn_band(T),
        f"cudnn frontend window {WINDOW}": cudnn_band(WINDOW),
        "flash2 full-causal": flash(T),
        f"flash2 window {WINDOW}": flash(WINDOW),
        f"flex window {WINDOW}": flex({}),
        f"cudnn stitched window {WINDOW}": stitched("cudnn"),
        f"flash2 stitched window {WINDOW}": stitched("flash"),
        f"flex window {WINDOW}, USE_TMA": flex({"USE_TMA": True}),
        f"flex window {WINDOW}, ROWS_GUARANTEED_SAFE": flex({"ROWS_GUARANTEED_SAFE": True}),
    }
    results, outputs = {}, {}
    for name, fn in pieces.items():
        try:
            results[name] = timed(fwd_bwd(fn, (q, k, v), (dout,)), iters)
            outputs[name] = (fn(q, k, v).float(), *(x.grad.float() for x in (q, k, v)))
        except Exception as e:  # a kernel this torch lacks is a result too
            results[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        print(name, results[name], flush=True)
    # Same function on every path: the largest difference from a reference path, output and gradients.
    for name, ref in [("flash2 full-causal", "cudnn full-causal"), ("cudnn frontend full-causal", "cudnn full-causal"),
                      (f"cudnn frontend window {WINDOW}", f"flex window {WINDOW}"),
                      (f"flash2 window {WINDOW}", f"flex window {WINDOW}"),
                      (f"cudnn stitched window {WINDOW}", f"flex window {WINDOW}"),
                      (f"flash2 stitched window {WINDOW}", f"flex window {WINDOW}")]:
        if name in outputs and ref in outputs:
            results[name]["max_abs_diff_vs_" + ref] = max((a - b).abs().max().item() for a, b in zip(outputs[name], outputs[ref]))
    return results


def softcap_pieces(iters):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(B * T, WIDTH, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (torch.randn(VOCAB, WIDTH, device="cuda", generator=g) * 0.02).requires_grad_()
    y = torch.randint(0, VOCAB, (B * T,), device="cuda", generator=g)

    def loss_with(cap):
        def run(h, w):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = F.linear(h, w).float()
            return F.cross_entropy(cap(logits), y)

        return torch.compile(run, dynamic=False)

    pieces = {
        "15 tanh(x / 15)": loss_with(lambda x: 15 * torch.tanh(x / 15)),
        "15 (2 sigmoid(2x / 15) - 1)": loss_with(lambda x: 15 * (2 * torch.sigmoid(x * (2 / 15)) - 1)),
        "fused (harness/softcap_loss.py, as train.py runs it)": lambda h, w: softcap_loss.cross_entropy(h, w, y, 15.0),
    }
    results = {}
    for name, fn in pieces.items():
        results[name] = timed(fwd_bwd(fn, (h, w), (torch.tensor(1.0, device="cuda"),)), iters)
        results[name]["loss"] = fn(h, w).item()
        print(name, results[name], flush=True)
    return results


def rope_norm(x, cos, sin):
    """RoPE, then QK-norm, as the shipped train.py does them."""
    return TRAIN.norm(TRAIN.rotate(x, cos, sin))


def rope_tables():
    """cos and sin (1, T, 1, D) in bf16, laid out as train.py's GPT keeps them: (cos, cos) and (-sin, sin)."""
    angles = torch.outer(torch.arange(T, device="cuda").float(), 10000 ** (-torch.arange(D // 2, device="cuda") / (D // 2)))
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([-angles.sin(), angles.sin()], dim=-1)
    return cos[None, :, None, :].bfloat16(), sin[None, :, None, :].bfloat16()


def qkv_pieces(iters):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, WIDTH, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    wq, wk, wv = (torch.randn(WIDTH, WIDTH, device="cuda", generator=g).mul_(0.04).requires_grad_() for _ in range(3))
    cos, sin = rope_tables()
    grads = tuple(torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))

    def separate(x, wq, wk, wv):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            q, k, v = (F.linear(x, w).view(B, T, H, D) for w in (wq, wk, wv))
            return rope_norm(q, cos, sin), rope_norm(k, cos, sin), v

    def stacked(x, wq, wk, wv):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            q, k, v = F.linear(x, torch.cat([wq, wk, wv])).view(B, T, 3 * H, D).split(H, dim=2)
            return rope_norm(q, cos, sin), rope_norm(k, cos, sin), v

    results = {}
    for name, fn in {"three projections": separate, "one projection, stacked weights": stacked}.items():
        results[name] = timed(fwd_bwd(torch.compile(fn, dynamic=False), (x, wq, wk, wv), grads), iters)
        print(name, results[name], flush=True)
    return results


def rope_with_slices(x, cos, sin):
    """RoPE and QK-norm as train.py wrote them until 2026-11-24, with cos and sin of the first half only."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return TRAIN.norm(torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1))


def triton_rope_norm():
    """RoPE then QK-norm as one hand-written Triton kernel each way; the backward works from the output
    (which the attention keeps anyway) and 1/rms, so nothing else is saved. Measured, not adopted."""
    import triton
    import triton.language as tl

    ROWS = 16  # (position, head) rows of D channels per program

    @triton.jit
    def forward_kernel(X, COS, SIN, Y, RSTD, n_rows, H, T, eps, HALF: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        live = (rows < n_rows)[:, None]
        cols = tl.arange(0, HALF)[None, :]
        at = rows[:, None] * (2 * HALF)
        t = ((rows // H) % T)[:, None] * HALF
        x1 = tl.load(X + at + cols, mask=live).to(tl.float32)
        x2 = tl.load(X + at + HALF + cols, mask=live).to(tl.float32)
        c, s = tl.load(COS + t + cols, mask=live).to(tl.float32), tl.load(SIN + t + cols, mask=live).to(tl.float32)
        r1, r2 = x1 * c - x2 * s, x1 * s + x2 * c
        rstd = tl.rsqrt((tl.sum(r1 * r1, 1) + tl.sum(r2 * r2, 1)) / (2 * HALF) + eps)
        tl.store(Y + at + cols, (r1 * rstd[:, None]).to(Y.dtype.element_ty), mask=live)
        tl.store(Y + at + HALF + cols, (r2 * rstd[:, None]).to(Y.dtype.element_ty), mask=live)
        tl.store(RSTD + rows, rstd, mask=rows < n_rows)

    @triton.jit
    def backward_kernel(DY, Y, COS, SIN, RSTD, DX, n_rows, H, T, sb, st, sh, HALF: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        live = (rows < n_rows)[:, None]
        cols = tl.arange(0, HALF)[None, :]
        at = rows[:, None] * (2 * HALF)
        h, t, b = (rows % H)[:, None], ((rows // H) % T)[:, None], (rows // (H * T))[:, None]
        dat = b.to(tl.int64) * sb + t * st + h * sh  # the gradient may come in the attention's layout
        dy1 = tl.load(DY + dat + cols, mask=live).to(tl.float32)
        dy2 = tl.load(DY + dat + HALF + cols, mask=live).to(tl.float32)
        y1, y2 = tl.load(Y + at + cols, mask=live).to(tl.float32), tl.load(Y + at + HALF + cols, mask=live).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < n_rows)[:, None]
        dot = ((tl.sum(dy1 * y1, 1) + tl.sum(dy2 * y2, 1)) / (2 * HALF))[:, None]
        dr1, dr2 = rstd * (dy1 - y1 * dot), rstd * (dy2 - y2 * dot)  # through the norm
        c, s = tl.load(COS + t * HALF + cols, mask=live).to(tl.float32), tl.load(SIN + t * HALF + cols, mask=live).to(tl.float32)
        tl.store(DX + at + cols, (dr1 * c + dr2 * s).to(DX.dtype.element_ty), mask=live)  # and back through the rotation
        tl.store(DX + at + HALF + cols, (dr2 * c - dr1 * s).to(DX.dtype.element_ty), mask=live)

    class RopeNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, cos, sin):  # x (B, T, H, D) contiguous; cos, sin (T, D/2)
            b, t, h, d = x.shape
            y, rstd = torch.empty_like(x), torch.empty(b * t * h, device=x.device)
            grid = (triton.cdiv(b * t * h, ROWS),)
            forward_kernel[grid](x, cos, sin, y, rstd, b * t * h, h, t, torch.finfo(x.dtype).eps, HALF=d // 2, ROWS=ROWS)
            ctx.save_for_backward(y, cos, sin, rstd)
            return y

        @staticmethod
        def backward(ctx, dy):
            y, cos, sin, rstd = ctx.saved_tensors
            b, t, h, d = y.shape
            dy = dy if dy.stride(-1) == 1 else dy.contiguous()
            dx = torch.empty_like(y)
            grid = (triton.cdiv(b * t * h, ROWS),)
            backward_kernel[grid](dy, y, cos, sin, rstd, dx, b * t * h, h, t, dy.stride(0), dy.stride(1), dy.stride(2),
                                  HALF=d // 2, ROWS=ROWS)
            return dx, None, None

    return RopeNorm.apply


def rope_pieces(iters):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    cos, sin = rope_tables()
    half_cos, half_sin = cos[..., : D // 2], sin[..., D // 2:]
    table_cos, table_sin = half_cos[0, :, 0].contiguous(), half_sin[0, :, 0].contiguous()
    kernel = triton_rope_norm()
    pieces = {
        "slices and cat": torch.compile(lambda x: rope_with_slices(x, half_cos, half_sin), dynamic=False),
        "roll (train.py)": torch.compile(lambda x: rope_norm(x, cos, sin), dynamic=False),
        "Triton kernel": lambda x: kernel(x, table_cos, table_sin),
    }
    # The gradient arrives in FlexAttention's layout: (B, H, T, D) in memory, seen as (B, T, H, D).
    grad = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    results, outputs = {}, {}
    for name, fn in pieces.items():
        results[name] = timed(fwd_bwd(fn, (x,), (grad,)), iters)
        outputs[name] = fn(x).float()
        print(name, results[name], flush=True)
    for name in ("roll (train.py)", "Triton kernel"):
        results[name]["max_abs_diff_vs_slices"] = (outputs[name] - outputs["slices and cat"]).abs().max().item()
    return results


def mlp_pieces(iters):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B * T, WIDTH, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    fc = (torch.randn(4 * WIDTH, WIDTH, device="cuda", generator=g) / math.sqrt(WIDTH)).requires_grad_()
    proj = (torch.randn(WIDTH, 4 * WIDTH, device="cuda", generator=g) / math.sqrt(4 * WIDTH)).requires_grad_()
    dy = torch.randn(B * T, WIDTH, device="cuda", dtype=torch.bfloat16, generator=g)

    def mlp(x, fc, proj):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return F.linear(F.relu(F.linear(x, fc)).square(), proj)

    results = {}
    for name, options in {"default compile": {}, "max-autotune (GEMM epilogues)": {"max_autotune": True}}.items():
        fn = torch.compile(mlp, dynamic=False, options=options or None)
        results[name] = timed(fwd_bwd(fn, (x, fc, proj), (dy,)), iters)
        print(name, results[name], flush=True)
    return results


PIECES = {"attention": attention_pieces, "softcap": softcap_pieces, "qkv": qkv_pieces, "rope": rope_pieces,
          "mlp": mlp_pieces}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PIECES), help="comma-separated pieces")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_float32_matmul_precision("high")
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shapes=dict(B=B, T=T, H=H, D=D, width=WIDTH))
    for name in args.only.split(","):
        print(f"== {name}", flush=True)
        results[name] = PIECES[name](args.iters)
        torch.cuda.empty_cache()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
