"""The fused soft-capped cross-entropy (harness/softcap_loss.py) computes train.py's training loss.

The GPU tests run only where CUDA and Triton are (the benchmark machine); on a CPU the op runs its
plain reference, and the tests before them check that train.py's two loss paths agree.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from autoresearch.harness import softcap_loss
from lab_helpers import load_script

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or not softcap_loss.available(torch.device("cuda")),
                                reason="needs a CUDA GPU and Triton")
TINY = dict(vocab_size=96, seq_len=32, n_layer=2, n_embd=64, n_head=2, n_kv_head=2, head_dim=32, window_pattern="SL")


@pytest.fixture(scope="module")
def train():
    return load_script()


def test_not_available_on_the_cpu():
    assert not softcap_loss.available(torch.device("cpu"))


def test_fused_loss_is_the_cross_entropy_of_the_models_logits(train):
    """The fused path starts from model.hidden() and the head's weight: it must equal the loss of forward()."""
    torch.manual_seed(0)
    model = train.build_model(TINY)
    with torch.no_grad():
        model.lm_head.weight.normal_(std=1.0)  # logits large enough for the soft cap to bend them
    x, y = torch.randint(0, 96, (3, 32)), torch.randint(0, 96, (3, 32))
    losses, grads = [], []
    for fused in (False, True):
        model.zero_grad()
        loss = train.make_loss_fn(model, compiled=False, fused=fused)(x, y)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def edited_script(tmp_path, old, new):
    """The template with forward() edited as a proposer might, imported as a module."""
    from lab_helpers import TEMPLATE
    text = TEMPLATE.read_text()
    assert old in text
    path = tmp_path / "train_edited.py"
    path.write_text(text.replace(old, new))
    return load_script(path, name=f"train_edited_{tmp_path.name}")


def check_rows(train):
    torch.manual_seed(0)
    model = train.build_model(TINY)
    return model, torch.randint(0, 96, (2, 32)), torch.randint(0, 96, (2, 32))


def test_the_step_0_check_passes_the_template_and_leaves_its_head_as_it_was(train):
    model, x, y = check_rows(train)
    head = model.lm_head.weight.detach().clone()
    train.check_fused_loss(model, x, y, contextlib.nullcontext())
    assert torch.equal(model.lm_head.weight, head)


@pytest.mark.parametrize("old, new", [
    ("return SOFTCAP * torch.tanh(logits / SOFTCAP)", "return 30.0 * torch.tanh(logits / 30.0)"),  # another cap
    ("return SOFTCAP * torch.tanh(logits / SOFTCAP)", "return logits"),  # no cap
    ("logits = self.lm_head(self.hidden(idx)).float()",
     "logits = self.lm_head(self.hidden(idx)).float() + torch.linspace(0, 8, self.config['vocab_size'])"),  # a bias
])
def test_an_edit_of_forward_that_the_fused_loss_does_not_follow_is_caught_before_training(tmp_path, old, new):
    train = edited_script(tmp_path, old, new)
    model, x, y = check_rows(train)
    with pytest.raises(ValueError, match=r"fused training loss .* is not the cross-entropy of model\(inputs\)"
                                         r".*fused=False"):
        train.check_fused_loss(model, x, y, contextlib.nullcontext())


def test_reference_soft_caps_before_the_cross_entropy():
    hidden, weight = torch.randn(5, 8), torch.randn(7, 8) * 10
    targets = torch.randint(0, 7, (5,))
    logits = hidden @ weight.T
    capped = 3.0 * torch.tanh(logits / 3.0)
    assert softcap_loss.reference(hidden, weight, targets, 3.0).item() == pytest.approx(
        F.cross_entropy(capped, targets).item(), rel=1e-6)
    assert softcap_loss.reference(hidden, weight, targets, 3.0) < F.cross_entropy(logits, targets)


def loss_and_grads(fn, hidden, weight, targets, scale):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    loss = fn(hidden, weight, targets, 15.0)
    (loss * scale).backward()  # as train.py divides by the gradient-accumulation steps
    return loss.detach(), hidden.grad.float(), weight.grad


def head_inputs(rows, vocab, width=64, spread=1.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(rows, width, device="cuda", generator=g).bfloat16()
    weight = torch.randn(vocab, width, device="cuda", generator=g) * spread * width**-0.5
    return hidden, weight, torch.randint(0, vocab, (rows,), device="cuda", generator=g)


@needs_cuda
@pytest.mark.parametrize("vocab", [8192, 1000])
@pytest.mark.parametrize("spread", [1.0, 40.0])  # logits near zero, and logits deep in the soft cap
def test_matches_the_reference_forward_and_backward(vocab, spread):
    hidden, weight, targets = head_inputs(512, vocab, spread=spread)
    want = loss_and_grads(softcap_loss.reference, hidden, weight, targets, 0.5)
    got = loss_and_grads(softcap_loss.cross_entropy, hidden, weight, targets, 0.5)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-4)
    for name, a, b in zip(("hidden", "weight"), got[1:], want[1:]):
        assert (a - b).abs().max() <= 0.01 * b.abs().max(), name  # the gradient passes through bf16 both ways


@needs_cuda
def test_every_target_gets_its_own_gradient():
    hidden, weight, targets = head_inputs(256, 300, seed=1)
    _, _, dweight = loss_and_grads(softcap_loss.cross_entropy, hidden, weight, targets, 1.0)
    _, _, dweight_shifted = loss_and_grads(softcap_loss.cross_entropy, hidden, weight, (targets + 1) % 300, 1.0)
    assert (dweight - dweight_shifted).abs().max() > 0.1 * dweight.abs().max()


@needs_cuda
def test_compiles_into_one_graph_with_the_same_result():
    hidden, weight, targets = head_inputs(1024, 2048, seed=2)
    eager = loss_and_grads(softcap_loss.cross_entropy, hidden, weight, targets, 0.25)
    compiled = loss_and_grads(torch.compile(softcap_loss.cross_entropy, fullgraph=True), hidden, weight, targets, 0.25)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


@needs_cuda
def test_train_pys_fused_and_plain_losses_agree_on_cuda(train):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = train.build_model(dict(TINY, vocab_size=512, seq_len=128))
    autocast, kernels, _ = train.setup_device(model, torch.device("cuda"))
    x, y = (torch.randint(0, 512, (4, 128), device="cuda") for _ in range(2))
    losses, grads = [], []
    for fused in (False, True):
        model.zero_grad()
        with kernels, autocast:
            loss = train.make_loss_fn(model, compiled=True, fused=fused)(x, y)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    assert (grads[1] - grads[0]).norm() <= 0.02 * grads[0].norm()
