"""
train.py: the research surface of autoresearch. Change anything in it.

A GPT trained with MuonAdamW for a fixed wall-clock budget; the lab then scores the checkpoint in
bits per byte on the fixed validation rows (val_bpb, lower is better) and prints the summary.
`python train.py` runs it by hand; the lab runs it in a sandbox and chooses the profile, data,
device and seed, never through flags.

What the lab relies on, and nothing else:
  - data comes from `run.train_loader(...)`: random rows to warm up on, training rows once
    `run.training_started()` is called, which starts the lab's clock;
  - `run.save_checkpoint(model, config, ...)` hands the weights in, which stops the clock;
  - `build_model(config)` rebuilds the model from that config, in another sandbox, for scoring;
  - `model(inputs)` returns logits (B, T, vocab) for int64 inputs (B, T), and never sees targets;
  - the training runs under `if __name__ == "__main__":`.
"""
import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import contextlib
import gc
import math
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from autoresearch import harness
from autoresearch.harness import cudnn_attention, softcap_loss

# ---------------------------------------------------------------------------------------------
# Hyperparameters: one `NAME = literal` per line (searches parse and rewrite these lines).
# Defaults are the reference's, for one H100; a profile may write other values over them.
# ---------------------------------------------------------------------------------------------
DEPTH = 8  # transformer blocks; width = DEPTH * ASPECT_RATIO rounded up to a multiple of HEAD_DIM
ASPECT_RATIO = 64  # model width per block of depth
HEAD_DIM = 128  # channels per attention head
N_KV_HEAD = 0  # key/value heads for grouped-query attention; 0 = one per query head
WINDOW_PATTERN = "SSSL"  # attention window per layer, cycled: S = half the context, L = all; last layer is L
TOTAL_BATCH_SIZE = 524288  # tokens per optimizer step
DEVICE_BATCH_SIZE = 128  # rows per forward/backward pass; lower it if memory runs out
EMBEDDING_LR = 0.6  # AdamW, token and value embeddings
UNEMBEDDING_LR = 0.004  # AdamW, the output head
MATRIX_LR = 0.04  # Muon, every matrix inside the blocks
SCALAR_LR = 0.5  # AdamW, the x0 lambdas (resid lambdas get 1% of it)
WEIGHT_DECAY = 0.2  # Muon's cautious weight decay, decayed linearly to 0 over the run
ADAM_BETAS = (0.8, 0.95)  # AdamW betas (the x0 lambdas use (0.96, 0.95))
WARMUP_RATIO = 0.0  # fraction of the time budget spent ramping the learning rate up
WARMDOWN_RATIO = 0.5  # fraction of the time budget spent decaying it to FINAL_LR_FRAC
FINAL_LR_FRAC = 0.0  # learning rate at the end, as a fraction of the peak
SEED = 42  # model initialisation and data order

SOFTCAP = 15.0  # logits = SOFTCAP * tanh(logits / SOFTCAP), in fp32
VE_GATE_CHANNELS = 32  # input channels of the value-embedding gate
ROPE_BASE = 10000.0
WARMUP_STEPS = 3  # forward/backward passes on the lab's random rows before the clock: compilation
LOG_EVERY_S = 5.0  # seconds between progress lines (the first steps are all printed)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # RMSNorm without parameters


def rotate(x, cos, sin):
    """RoPE on (B, T, H, D): rotate the pairs (x[i], x[i + D/2]) by position-dependent angles, with cos
    holding (cos, cos) and sin (-sin, sin) along D. Written with roll rather than slices and a cat, whose
    backward Inductor compiles into kernels 5% of a step slower on an H100."""
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * sin


def window_mask(T, window, device):
    """(T, T) bool, True where query i may see key j: itself and the `window` keys before it, as
    FlashAttention's window_size=(window, 0) in the reference."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (i - j <= window)


def attention(q, k, v, window, path="sdpa", block_mask=None):
    """Causal attention on (B, H, T, D) tensors; each query sees itself and the `window` keys before
    it. Every path computes the same function; they differ in speed only.
      cudnn: cuDNN's fused kernels, sliding windows included (Hopper, with nvidia-cudnn-frontend)
      flex:  FlexAttention with a block-sparse mask (sliding windows; needs torch.compile)
      sdpa:  scaled_dot_product_attention (cuDNN/flash for full causal, an explicit mask otherwise)
      plain: softmax(q k^T / sqrt(D)) v in fp32, the reference the tests compare against
    """
    T, gqa = q.size(2), q.size(1) != k.size(1)
    if path == "cudnn":
        return cudnn_attention.attention(q, k, v, window)
    if path == "flex" and block_mask is not None and torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if path == "plain":
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, dim=1).float(), v.repeat_interleave(rep, dim=1).float()
        scores = (q.float() @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        scores = scores.masked_fill(~window_mask(T, window, q.device), float("-inf"))
        return (scores.softmax(dim=-1) @ v).to(q.dtype)
    if window >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(T, window, q.device), enable_gqa=gqa)


def has_value_embedding(layer, n_layer):
    return layer % 2 == (n_layer - 1) % 2  # alternating layers, the last one included


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        d, self.n_head, self.n_kv_head, self.head_dim = cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"], cfg["head_dim"]
        self.c_q = nn.Linear(d, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)
        self.ve_gate = None
        if has_value_embedding(layer, cfg["n_layer"]):
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)

    def forward(self, x, ve, cos, sin, window, path, block_mask):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value embedding, mixed in through a gate in (0, 2), 1 at initialisation
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, n_kv_head)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim).to(v.dtype)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = norm(rotate(q, cos, sin)), norm(rotate(k, cos, sin))  # RoPE, then QK-norm
        y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), window, path, block_mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg["n_embd"], 4 * cfg["n_embd"], bias=False)
        self.c_proj = nn.Linear(4 * cfg["n_embd"], cfg["n_embd"], bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU squared


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)

    def forward(self, x, ve, cos, sin, window, path, block_mask):
        x = x + self.attn(norm(x), ve, cos, sin, window, path, block_mask)
        return x + self.mlp(norm(x))


def layer_windows(cfg):
    """How far back each layer's queries see (attention()): S = half the context, L = all of it; the last
    layer is L."""
    T = cfg["seq_len"]
    sizes = {"S": T // 2, "L": T}
    pattern = cfg["window_pattern"].upper()
    if not pattern or set(pattern) - set(sizes):
        raise ValueError(f"WINDOW_PATTERN must be made of S and L, got {cfg['window_pattern']!r}")
    windows = [sizes[pattern[i % len(pattern)]] for i in range(cfg["n_layer"])]
    windows[-1] = T
    return windows


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = dict(cfg)
        V, d, L = cfg["vocab_size"], cfg["n_embd"], cfg["n_layer"]
        kv_dim = cfg["n_kv_head"] * cfg["head_dim"]
        self.wte = nn.Embedding(V, d)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(L)])
        self.lm_head = nn.Linear(d, V, bias=False)  # not tied to wte
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(V, kv_dim) for i in range(L) if has_value_embedding(i, L)})
        self.resid_lambdas = nn.Parameter(torch.ones(L))  # scales the residual stream before each block
        self.x0_lambdas = nn.Parameter(torch.full((L,), 0.1))  # mixes the normed embedding back in
        self.windows = layer_windows(cfg)
        half = cfg["head_dim"] // 2
        inv_freq = ROPE_BASE ** (-torch.arange(half, dtype=torch.float32) / half)
        angles = torch.outer(torch.arange(cfg["seq_len"], dtype=torch.float32), inv_freq)[None, :, None, :]
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], dim=-1), persistent=False)
        # Set by the training script for this process's kernels; not part of the checkpoint.
        self.attn_path = "sdpa"  # "sdpa", "cudnn", "flex" (sliding windows under torch.compile) or "plain"
        self.block_masks = {}  # window -> FlexAttention BlockMask
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        s = 3**0.5 * self.config["n_embd"] ** -0.5  # uniform bound with std 1/sqrt(width)
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)  # every block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)  # gate = 2 sigmoid(0) = 1
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)

    def use_flex_attention(self, device):
        """Serve the sliding-window layers with FlexAttention (only inside torch.compile)."""
        from torch.nn.attention.flex_attention import create_block_mask

        T = self.config["seq_len"]
        for w in set(self.windows) - {T}:
            def mask_mod(b, h, q_idx, kv_idx, w=w):
                return (kv_idx <= q_idx) & (q_idx - kv_idx <= w)

            self.block_masks[w] = create_block_mask(mask_mod, None, None, T, T, device=device)
        self.attn_path = "flex"

    def forward(self, idx):
        """Logits (B, T, vocab), soft-capped, in fp32."""
        logits = self.lm_head(self.hidden(idx)).float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP)

    def hidden(self, idx):
        """The normed final hidden state (B, T, width) that the head turns into logits."""
        B, T = idx.shape
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = self.wte(idx)
        if torch.is_autocast_enabled(idx.device.type):  # under autocast the residual stream is bf16 too
            x = x.to(torch.get_autocast_dtype(idx.device.type))
        x = x0 = norm(x)
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            w = self.windows[i]
            block_mask = self.block_masks.get(w) if T == self.config["seq_len"] else None
            x = block(x, ve, cos, sin, w, self.attn_path, block_mask)
        return norm(x)


def model_config(vocab_size, seq_len):
    width = -(-DEPTH * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
    n_head = width // HEAD_DIM
    n_kv_head = N_KV_HEAD or n_head
    if n_head % n_kv_head:
        raise ValueError(f"N_KV_HEAD={N_KV_HEAD} must divide the {n_head} query heads")
    return dict(vocab_size=vocab_size, seq_len=seq_len, n_layer=DEPTH, n_embd=width, n_head=n_head,
                n_kv_head=n_kv_head, head_dim=HEAD_DIM, window_pattern=WINDOW_PATTERN)


def build_model(config):
    """The model described by `config` (a dict saved in the checkpoint), freshly initialised on the
    current default device. The lab calls this, then load_state_dict, to score a checkpoint."""
    return GPT(config)


def flops_per_token(model, exact=False):
    """Training FLOPs per token: 6 per matrix weight (the embeddings are lookups) plus attention.
    The reference's estimate counts every query against min(window, T) keys; exact=True counts the
    keys a causal query really sees (on average about half as many)."""
    cfg = model.config
    lookups = model.wte.weight.numel() + sum(e.weight.numel() for e in model.value_embeds.values())
    scalars = model.resid_lambdas.numel() + model.x0_lambdas.numel()
    dense = sum(p.numel() for p in model.parameters()) - lookups - scalars
    T, qdim = cfg["seq_len"], cfg["n_head"] * cfg["head_dim"]
    keys = 0.0
    for w in model.windows:
        keys += sum(min(i + 1, w + 1) for i in range(T)) / T if exact else min(w, T)
    return 6 * dense + 12 * qdim * keys


# ---------------------------------------------------------------------------------------------
# Optimizer: Muon (with NorMuon and cautious weight decay) for block matrices, AdamW for the rest
# ---------------------------------------------------------------------------------------------
# Polar Express coefficients (Amsel et al. 2025, as used by modded-nanogpt and nanochat): five
# steps of X <- a X + b (X X^T) X + c (X X^T)^2 X, each pulling the singular values towards 1.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(g):
    """Approximately orthogonalise a stack of matrices (N, rows, cols), in bf16: U V^T of g's SVD."""
    x = g.bfloat16()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # singular values now below 1
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # iterate on the wide side: the Gram matrix is the smaller one
    for a, b, c in POLAR_EXPRESS:
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if tall else x


def muon_update(params, grads, momentum_buf, second_moment, momentum, lr, wd, beta2):
    """One Muon step for a group of same-shape matrices, in place on `params`."""
    p, g = torch.stack(params), torch.stack(grads)
    momentum_buf.lerp_(g, 1 - momentum)
    u = polar_express(g.lerp_(momentum_buf, momentum)).float()  # Nesterov, then orthogonalise
    # NorMuon: divide each row (each column, for wide matrices) by the running RMS of its updates,
    # then rescale so that the update keeps the Frobenius norm the orthogonalisation gave it.
    dim = -1 if u.size(-2) >= u.size(-1) else -2
    mean_sq = u.square().mean(dim=dim, keepdim=True)
    second_moment.lerp_(mean_sq, 1 - beta2)
    scale = second_moment.clamp_min(1e-10).rsqrt()
    before = mean_sq.sum(dim=(-2, -1), keepdim=True)
    after = (mean_sq * scale.square()).sum(dim=(-2, -1), keepdim=True)
    u = u * (scale * (before / after.clamp_min(1e-20)).sqrt())
    # Cautious weight decay: decay only the entries whose update already moves them towards zero.
    decay = (u * p >= 0).to(u.dtype) * p
    p.sub_(lr * (u + wd * decay))
    for param, new in zip(params, p.unbind(0)):
        param.copy_(new)


def adamw_update(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    p.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt() + eps
    p.sub_(lr / (1 - beta1**step) * exp_avg / denom)


class MuonAdamW(torch.optim.Optimizer):
    """Groups of kind 'adamw' (lr, betas, eps, weight_decay) and 'muon' (lr, momentum, beta2,
    weight_decay; every parameter of a group has the same shape, so one stacked update serves it).
    It runs eagerly: compiled, it was no faster on an H100 and cost 21 s of compilation per run."""

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])
            if group["kind"] == "muon":
                assert len({p.shape for p in group["params"]}) == 1, "a Muon group holds one shape"

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["kind"] == "adamw":
                beta1, beta2 = group["betas"]
                for p in params:
                    state = self.state[p]
                    if not state:
                        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    state["step"] += 1
                    adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"],
                                 beta1, beta2, group["eps"], group["weight_decay"])
            else:
                state = self.state[params[0]]
                rows, cols = params[0].shape
                if not state:
                    state["momentum_buffer"] = torch.zeros(len(params), rows, cols, device=params[0].device)
                    shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
                    state["second_moment"] = torch.zeros(shape, device=params[0].device)
                lr = group["lr"] * max(1.0, rows / cols) ** 0.5
                muon_update(params, [p.grad for p in params], state["momentum_buffer"], state["second_moment"],
                            group["momentum"], lr, group["weight_decay"], group["beta2"])


def setup_optimizer(model):
    width = model.config["n_embd"]
    scale = (width / 768) ** -0.5  # AdamW rates were tuned at width 768
    block_matrices = [p for p in model.blocks.parameters()]
    assert all(p.ndim == 2 for p in block_matrices)
    adamw = dict(kind="adamw", betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0)
    groups = [
        dict(adamw, params=[model.lm_head.weight], lr=UNEMBEDDING_LR * scale),
        dict(adamw, params=[model.wte.weight], lr=EMBEDDING_LR * scale),
        dict(adamw, params=list(model.value_embeds.parameters()), lr=EMBEDDING_LR * scale),
        dict(adamw, params=[model.resid_lambdas], lr=SCALAR_LR * 0.01 * scale),
        dict(adamw, params=[model.x0_lambdas], lr=SCALAR_LR * scale, betas=(0.96, 0.95)),
    ]
    for shape in sorted({tuple(p.shape) for p in block_matrices}):
        same = [p for p in block_matrices if tuple(p.shape) == shape]
        groups.append(dict(kind="muon", params=same, lr=MATRIX_LR, momentum=0.95, beta2=0.95,
                           weight_decay=WEIGHT_DECAY))
    n_opt = sum(p.numel() for g in groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters()), "every parameter belongs to one group"
    return MuonAdamW(groups)


# ---------------------------------------------------------------------------------------------
# Schedules (progress = training seconds / time budget)
# ---------------------------------------------------------------------------------------------
def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    left = (1.0 - progress) / WARMDOWN_RATIO
    return left + (1 - left) * FINAL_LR_FRAC


def muon_momentum(step):
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def cpu_has_bf16():
    """Whether this CPU multiplies bf16 natively (elsewhere bf16 is emulated, slower than fp32)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def sum_gradients(model):
    """Data parallelism, under torchrun: one all-reduce of every rank's gradients, laid end to end. Each rank divided
    its loss by the number of ranks: the sum is the gradient of one process over every rank's micro-batches."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(summed.view_as(g))


def setup_device(model, device):
    """Precision and attention kernels for `device`: (autocast context, SDPA-backend context, description)."""
    autocast, attn_kernels, paths = contextlib.nullcontext(), contextlib.nullcontext(), "sdpa"
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()):
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    if cudnn_attention.available(device):  # Hopper: cuDNN's fused attention is the fastest exact one
        model.attn_path, paths = "cudnn", "cudnn"
    elif device.type == "cuda":
        if torch.cuda.get_device_capability(device) >= (9, 0):  # without the frontend, cuDNN through SDPA
            from torch.nn.attention import SDPBackend, sdpa_kernel

            order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH]
            attn_kernels, paths = sdpa_kernel(order, set_priority=True), "sdpa(cudnn)"
        if any(w < model.config["seq_len"] for w in model.windows):
            model.use_flex_attention(device)  # sliding windows: block-sparse FlexAttention
            paths += "+flex"
    return autocast, attn_kernels, paths


def make_loss_fn(model, compiled, fused=False):
    """The training loss: cross-entropy of model(inputs) against the targets. fused=True computes the same
    function from model.hidden() with the harness's fused head, soft cap and cross-entropy, which never
    writes fp32 logits (7 ms of a 304 ms step on an H200); if you change how forward() makes logits, change
    this too, or leave fused False."""
    def loss_fn(inputs, targets):
        if fused:
            return softcap_loss.cross_entropy(model.hidden(inputs), model.lm_head.weight, targets, SOFTCAP)
        logits = model(inputs)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    return torch.compile(loss_fn, dynamic=False) if compiled else loss_fn


def check_fused_loss(model, inputs, targets, autocast):
    """The fused loss trains the function the lab scores, model(inputs), only if both are the head, soft
    cap and cross-entropy of model.hidden(). Checked once before training, on a few rows, with the head's
    weights made large for the check (at initialisation they are near zero, where any soft cap looks like
    none), so that an edit of forward() is caught before it trains one function and is scored on another."""
    head = model.lm_head.weight
    saved = head.detach().clone()
    with torch.no_grad(), autocast:
        head.normal_(std=20 / head.size(1) ** 0.5)
        logits = model(inputs)
        plain = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        fused = softcap_loss.cross_entropy(model.hidden(inputs), head, targets, SOFTCAP).float()
        head.copy_(saved)
    if not torch.isclose(fused, plain, rtol=2e-2):
        raise ValueError(f"the fused training loss ({fused.item():.4f}) is not the cross-entropy of model(inputs) "
                         f"({plain.item():.4f}): forward() makes its logits otherwise than head, soft cap and "
                         "cross-entropy of model.hidden(). Change the fused path in make_loss_fn to match, or "
                         "train on the plain loss (make_loss_fn(..., fused=False)).")


def main():
    run = harness.start_run()
    device, T, world = run.device, run.seq_len, run.world_size
    cuda, lead = device.type == "cuda", run.rank == 0  # the lead rank prints and hands the weights in
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    compiled = cuda  # torch.compile pays off on CUDA only; CPU and MPS run eagerly
    seed = run.seed(SEED)  # the lab may repeat a run under another seed
    torch.manual_seed(seed)
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32
    tokens_per_pass = DEVICE_BATCH_SIZE * T * world  # one micro-batch of every rank
    if TOTAL_BATCH_SIZE % tokens_per_pass:
        ranks = (" * ranks", f" * {world}") if world > 1 else ("", "")
        raise ValueError(f"TOTAL_BATCH_SIZE={TOTAL_BATCH_SIZE} must be a multiple of DEVICE_BATCH_SIZE * seq_len"
                         f"{ranks[0]} = {DEVICE_BATCH_SIZE} * {T}{ranks[1]} = {tokens_per_pass}")
    grad_accum = TOTAL_BATCH_SIZE // tokens_per_pass

    config = model_config(run.vocab_size, T)
    with torch.device(device):
        model = build_model(config)
    num_params = sum(p.numel() for p in model.parameters())
    flops = flops_per_token(model)
    optimizer = setup_optimizer(model)
    autocast, attn_kernels, paths = setup_device(model, device)
    fused_loss = compiled and softcap_loss.available(device)
    train_loss = make_loss_fn(model, compiled, fused_loss)
    loader = run.train_loader(DEVICE_BATCH_SIZE, seed)
    peak = harness.peak_flops(harness.device_name(device)) * world  # 0 where unknown: no MFU
    if lead:
        print(f"device={device} profile={run.profile.name} params={num_params:,} width={config['n_embd']} "
              f"heads={config['n_head']} kv_heads={config['n_kv_head']} windows={model.windows} attention={paths} "
              f"loss={'fused' if fused_loss else 'plain'} grad_accum={grad_accum} ranks={world} "
              f"budget_s={run.time_budget:g} flops_per_token={flops:.3e}", flush=True)

    with attn_kernels:
        # Warm-up on the lab's random rows: compilation and allocation, before the clock; nothing is learnt.
        inputs, targets, _ = next(loader)
        if fused_loss:
            check_fused_loss(model, inputs[:2], targets[:2], autocast)
        for _ in range(WARMUP_STEPS if compiled else 1):
            with autocast:
                train_loss(inputs, targets).backward()
        model.zero_grad(set_to_none=True)
        gc.collect()  # everything allocated from now on lives until the end: stop the GC
        gc.freeze()
        gc.disable()
        if world > 1:  # every rank starts from rank 0's weights, and the clock once the slowest is ready
            for p in model.parameters():
                dist.broadcast(p.data, src=0)
        run.training_started()
        t_train = time.time()  # the budget counts from here, on the lab's clock too, to the hand-in

        step, training_time, smooth_loss, last_log = 0, 0.0, 0.0, 0.0
        inputs, targets, epoch = next(loader)
        while True:
            t0 = time.time()
            for _ in range(grad_accum):
                with autocast:
                    loss = train_loss(inputs, targets)
                (loss / (grad_accum * world)).backward()
                inputs, targets, epoch = next(loader)
            if world > 1:
                sum_gradients(model)
            progress = min(training_time / run.time_budget, 1.0)
            lrm = lr_multiplier(progress)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if group["kind"] == "muon":
                    group["momentum"] = muon_momentum(step)
                    group["weight_decay"] = WEIGHT_DECAY * (1 - progress)
            optimizer.step()
            model.zero_grad(set_to_none=True)
            loss_f = loss.item()  # waits for the device
            dt = time.time() - t0
            training_time = time.time() - t_train
            if world > 1:  # the mean loss and rank 0's clock (the lab's), so that every rank decides alike
                shared = torch.tensor([loss_f / world, training_time * lead, dt * lead], dtype=torch.double).to(device)
                dist.all_reduce(shared)
                loss_f, training_time, dt = shared.tolist()
            if not math.isfinite(loss_f) or loss_f > 100:
                raise harness.TrainingDiverged(
                    f"training loss is {loss_f} at step {step}: the run diverged. Lower the learning rates "
                    "(MATRIX_LR, EMBEDDING_LR, UNEMBEDDING_LR, SCALAR_LR), or undo the last change.")
            step += 1
            smooth_loss = 0.9 * smooth_loss + 0.1 * loss_f
            done = training_time + dt > run.time_budget  # another step would overrun it
            now = time.time()
            if lead and (step <= 3 or done or now - last_log >= LOG_EVERY_S):
                last_log = now
                tok_s = TOTAL_BATCH_SIZE / dt
                print(f"train step={step} progress_pct={100 * progress:.1f} loss={smooth_loss / (1 - 0.9**step):.4f} "
                      f"lrm={lrm:.3f} dt_ms={1000 * dt:.0f} tok_per_s={tok_s:.0f} "
                      f"mfu_pct={100 * flops * tok_s / peak if peak else 0.0:.1f} epoch={epoch} "
                      f"remaining_s={max(0.0, run.time_budget - training_time):.0f}", flush=True)
            if done:
                break

    # The clock stops when the weights reach the lab, which scores them and prints the summary.
    if lead:
        run.save_checkpoint(model, config, num_steps=step, flops_per_token=flops, depth=DEPTH,
                            final_train_loss=smooth_loss / (1 - 0.9**step), epoch=epoch, attention=paths,
                            loss="fused" if fused_loss else "plain", seed=seed)
    if world > 1:
        dist.destroy_process_group()  # a rank leaving with its group alive may abort: torchrun would see a crash


if __name__ == "__main__":
    main()
