"""cuDNN's sliding-window attention (harness/cudnn_attention.py) computes train.py's attention.

These run only on a GPU with nvidia-cudnn-frontend installed (the H100 benchmark machine); on a CPU
only the first one runs.
"""
import pytest
import torch

from autoresearch.harness import cudnn_attention
from lab_helpers import load_script

needs_cudnn = pytest.mark.skipif(not torch.cuda.is_available() or not cudnn_attention.available(torch.device("cuda")),
                                 reason="needs a Hopper GPU and nvidia-cudnn-frontend")


@pytest.fixture(scope="module")
def train():
    return load_script()


def test_not_available_on_the_cpu(train):
    assert not cudnn_attention.available(torch.device("cpu"))
    model = train.build_model(dict(vocab_size=64, seq_len=16, n_layer=2, n_embd=32, n_head=2, n_kv_head=2,
                                   head_dim=16, window_pattern="SL"))
    _, _, paths = train.setup_device(model, torch.device("cpu"))
    assert model.attn_path == "sdpa" and paths == "sdpa"


def qkv(B, H, H_kv, T, D, seed=0):
    """q, k, v as the model hands them over: (B, H, T, D) views of (B, T, H, D) bf16 projections."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, T, h, D, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
               for h in (H, H_kv, H_kv))
    return [t.detach().requires_grad_() for t in (q, k, v)]


def forward_backward(fn, q, k, v, grad_out):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(grad_out)
    return [out.detach().float()] + [t.grad.float() for t in (q, k, v)]


@needs_cudnn
@pytest.mark.parametrize("window", [256, 128, 5])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_matches_the_plain_path_forward_and_backward(train, window, kv_heads):
    q, k, v = qkv(2, 4, kv_heads, 256, 64)
    grad_out = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    want = forward_backward(lambda *a: train.attention(*a, window, path="plain"), q, k, v, grad_out)
    got = forward_backward(lambda *a: train.attention(*a, window, path="cudnn"), q, k, v, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert (a - b).abs().max() <= 0.02 * b.abs().max(), name  # bf16 inputs, fp32 reference


@needs_cudnn
def test_window_skips_the_keys_before_it(train):
    q, k, v = qkv(1, 2, 2, 128, 64, seed=1)
    full, short = (cudnn_attention.attention(q, k, v, w).float() for w in (128, 8))
    assert torch.equal(full[:, :, :9], short[:, :, :9])  # query i <= 8 sees every key either way
    assert (full[:, :, 9:] - short[:, :, 9:]).abs().amax(dim=(0, 1, 3)).min() > 1e-3


@needs_cudnn
def test_compiles_into_one_graph_with_the_same_result():
    q, k, v = qkv(2, 4, 4, 256, 64, seed=2)
    grad_out = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16)
    eager = forward_backward(lambda *a: cudnn_attention.attention(*a, 100), q, k, v, grad_out)
    compiled_fn = torch.compile(lambda *a: cudnn_attention.attention(*a, 100), fullgraph=True)
    compiled = forward_backward(compiled_fn, q, k, v, grad_out)
    for a, b in zip(compiled, eager):
        assert torch.allclose(a, b, atol=1e-2)


@needs_cudnn
def test_output_is_laid_out_for_the_head_merge():
    q, k, v = qkv(2, 4, 4, 64, 32)
    out = cudnn_attention.attention(q, k, v, 64)
    assert out.shape == (2, 4, 64, 32) and out.transpose(1, 2).is_contiguous()


@needs_cudnn
def test_rejects_fp32():
    q, k, v = (t.detach().float() for t in qkv(1, 2, 2, 64, 32))
    with pytest.raises(TypeError, match="bf16"):
        cudnn_attention.attention(q, k, v, 64)


@needs_cudnn
def test_the_model_trains_on_it_on_hopper(train):
    model = train.build_model(dict(vocab_size=64, seq_len=128, n_layer=2, n_embd=128, n_head=2, n_kv_head=2,
                                   head_dim=64, window_pattern="SL")).cuda()
    autocast, _, paths = train.setup_device(model, torch.device("cuda"))
    assert model.attn_path == "cudnn" and paths == "cudnn"
    idx = torch.randint(0, 64, (4, 128), device="cuda")
    with autocast:
        loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
