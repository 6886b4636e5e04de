"""MuonAdamW of the train.py template, checked against slow float64 references written here.

Muon: Nesterov momentum, Polar Express orthogonalisation (bf16 in the script), NorMuon second-moment
normalisation, cautious weight decay, lr scaled by sqrt(max(1, rows/cols)). AdamW: bias-corrected
Adam with decoupled weight decay, per group.
"""
import math

import pytest
import torch

from lab_helpers import load_script


@pytest.fixture(scope="module")
def train():
    return load_script(name="train_template_under_test")


# ---- float64 references ----------------------------------------------------------------------

def ref_polar_express(g, coeffs):
    x = g / (torch.linalg.matrix_norm(g, keepdim=True) * 1.02 + 1e-6)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    for a, b, c in coeffs:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class RefMuon:
    """One group of same-shape matrices, float64 throughout."""

    def __init__(self, params, coeffs, beta2):
        self.p = torch.stack([p.detach().double() for p in params])
        self.buf = torch.zeros_like(self.p)
        rows, cols = self.p.shape[-2:]
        self.dim = -1 if rows >= cols else -2
        self.v = torch.zeros_like(self.p.square().mean(dim=self.dim, keepdim=True))
        self.coeffs, self.beta2 = coeffs, beta2

    def orthogonalised(self, grads, momentum):
        g = torch.stack([g.double() for g in grads])
        buf = momentum * self.buf + (1 - momentum) * g
        nesterov = momentum * buf + (1 - momentum) * g
        return buf, ref_polar_express(nesterov, self.coeffs)

    def step(self, grads, lr, momentum, wd):
        self.buf, u = self.orthogonalised(grads, momentum)
        mean_sq = u.square().mean(dim=self.dim, keepdim=True)
        self.v = self.beta2 * self.v + (1 - self.beta2) * mean_sq
        scaled = u / self.v.sqrt()
        scaled = scaled * torch.linalg.matrix_norm(u, keepdim=True) / torch.linalg.matrix_norm(scaled, keepdim=True)
        rows, cols = self.p.shape[-2:]
        lr = lr * math.sqrt(max(1.0, rows / cols))
        cautious = (scaled * self.p >= 0).double()
        self.p = self.p - lr * scaled - lr * wd * cautious * self.p
        return scaled


def muon_group(train, shape, n=3, lr=0.02, momentum=0.9, wd=0.3, seed=0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(*shape) * 0.1) for _ in range(n)]
    opt = train.MuonAdamW([dict(kind="muon", params=params, lr=lr, momentum=momentum, beta2=0.95, weight_decay=wd)])
    ref = RefMuon(params, train.POLAR_EXPRESS, beta2=0.95)
    return params, opt, ref


def set_grads(params, seed):
    torch.manual_seed(seed)
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return grads


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---- Muon --------------------------------------------------------------------------------------

def test_polar_express_coefficients_are_the_published_five(train):
    assert len(train.POLAR_EXPRESS) == 5
    assert train.POLAR_EXPRESS[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)
    assert train.POLAR_EXPRESS[-1] == (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)


@pytest.mark.parametrize("shape", [(64, 160), (160, 64), (96, 96)])
def test_polar_express_orthogonalises_in_bf16(train, shape):
    torch.manual_seed(1)
    # Singular values spread over a decade: Polar Express must bring all of them near 1.
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], dtype=torch.float64))
    k = min(shape)
    s = torch.logspace(0, -1, k, dtype=torch.float64)
    g = (u[:, :k] * s) @ v[:, :k].T
    out = train.polar_express(g.float()[None])[0]
    assert out.dtype == torch.bfloat16
    # Polar Express (five steps, 2% safety) lands every singular value in about [0.86, 1.14].
    sv = torch.linalg.svdvals(out.double())
    assert sv.min() > 0.8 and sv.max() < 1.2, sv
    ref = ref_polar_express(g, train.POLAR_EXPRESS)
    ref_sv = torch.linalg.svdvals(ref)
    assert ref_sv.min() > 0.85 and ref_sv.max() < 1.15
    assert rel_err(out, ref) < 0.08  # the fp64 reference of the same maths, to bf16 precision
    assert rel_err(out, u[:, :k] @ v[:, :k].T) < 0.15  # near the exact polar factor U V^T


@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_muon_steps_match_float64_reference(train, shape):
    params, opt, ref = muon_group(train, shape)
    for step in range(3):
        before = torch.stack([p.detach().double() for p in params])
        ref.p = before.clone()  # start each step from the same parameters
        set_grads(params, seed=10 + step)
        ref.step([p.grad for p in params], lr=0.02, momentum=0.9, wd=0.3)
        opt.step()
        got = torch.stack([p.detach().double() for p in params])
        assert rel_err(got - before, ref.p - before) < 0.08, step  # the update, to bf16 precision
        state = opt.state[params[0]]
        assert rel_err(state["momentum_buffer"], ref.buf) < 1e-6  # momentum is kept in fp32
        assert rel_err(state["second_moment"], ref.v) < 0.1


@pytest.mark.parametrize("shape", [(64, 128), (128, 64)])
def test_normuon_equalises_rows_and_keeps_the_norm(train, shape):
    """After one step from a fresh state, every row (column, for wide matrices) of the update has the
    same RMS, and the update keeps the Frobenius norm the orthogonalisation gave it."""
    params, opt, ref = muon_group(train, shape, n=2, wd=0.0)
    before = torch.stack([p.detach().clone() for p in params])
    grads = set_grads(params, seed=3)
    _, ortho = ref.orthogonalised(grads, momentum=0.9)
    opt.step()
    lr = 0.02 * math.sqrt(max(1.0, shape[0] / shape[1]))
    update = (before - torch.stack([p.detach() for p in params])).double() / lr
    dim = -1 if shape[0] >= shape[1] else -2
    rms = update.square().mean(dim=dim).sqrt()
    assert (rms.max(dim=-1).values / rms.min(dim=-1).values).max() < 1.01
    norms = torch.linalg.matrix_norm(update) / torch.linalg.matrix_norm(ortho)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-2)
    assert (update.sign() == ortho.sign()).double().mean() > 0.95  # rescaled, not rotated


def test_cautious_weight_decay_only_where_update_and_parameter_agree(train):
    """Two identical optimizers, with and without decay, see the same gradients: their difference is
    the decay alone, lr * wd * p, and it must appear exactly where the update and p agree in sign."""
    lr, wd = 0.01, 5.0
    with_decay, opt, _ = muon_group(train, (32, 48), n=2, lr=lr, wd=wd)
    without, opt_plain, _ = muon_group(train, (32, 48), n=2, lr=lr, wd=0.0)
    p0 = torch.stack([p.detach().clone() for p in with_decay]).double()
    for params, o in ((with_decay, opt), (without, opt_plain)):
        set_grads(params, seed=4)
        o.step()
    p_decay = torch.stack([p.detach() for p in with_decay]).double()
    p_plain = torch.stack([p.detach() for p in without]).double()
    update = (p0 - p_plain) / lr
    agree = update * p0 >= 0
    assert 0.3 < agree.double().mean() < 0.7
    decay = (p_plain - p_decay) / (lr * wd)
    assert torch.allclose(decay[agree], p0[agree], atol=1e-5)
    assert torch.allclose(decay[~agree], torch.zeros_like(decay[~agree]), atol=1e-5)


def test_muon_lr_scales_with_aspect_ratio(train):
    """Tall matrices (rows > cols) step sqrt(rows/cols) times further; wide ones are not scaled."""
    sizes = {}
    for shape in [(64, 64), (256, 64), (64, 256)]:
        params, opt, _ = muon_group(train, shape, n=1, wd=0.0)
        p0 = params[0].detach().clone()
        set_grads(params, seed=5)
        opt.step()
        sizes[shape] = ((params[0].detach() - p0).square().mean().sqrt() * math.sqrt(max(shape) / min(shape))).item()
    # With the RMS of an orthogonal (r, c) update ~ 1/sqrt(max(r, c)), times the lr scale:
    assert sizes[(256, 64)] / sizes[(64, 64)] == pytest.approx(2.0, rel=0.1)
    assert sizes[(64, 256)] / sizes[(64, 64)] == pytest.approx(1.0, rel=0.1)


# ---- AdamW -------------------------------------------------------------------------------------

def test_adamw_groups_match_float64_reference(train):
    torch.manual_seed(6)
    a = torch.nn.Parameter(torch.randn(10, 7))
    b = torch.nn.Parameter(torch.randn(5))
    groups = [
        dict(kind="adamw", params=[a], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
        dict(kind="adamw", params=[b], lr=0.5, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.1),
    ]
    opt = train.MuonAdamW(groups)
    refs = []
    for g in groups:
        p = g["params"][0]
        refs.append(dict(p=p.detach().double().clone(), m=torch.zeros_like(p, dtype=torch.float64),
                         v=torch.zeros_like(p, dtype=torch.float64), **{k: g[k] for k in ("lr", "betas", "eps", "weight_decay")}))
    for t in range(1, 4):
        torch.manual_seed(100 + t)
        for g, r in zip(groups, refs):
            p = g["params"][0]
            p.grad = torch.randn_like(p)
            grad = p.grad.double()
            b1, b2 = r["betas"]
            r["p"] = r["p"] * (1 - r["lr"] * r["weight_decay"])
            r["m"] = b1 * r["m"] + (1 - b1) * grad
            r["v"] = b2 * r["v"] + (1 - b2) * grad**2
            m_hat, v_hat = r["m"] / (1 - b1**t), r["v"] / (1 - b2**t)
            r["p"] = r["p"] - r["lr"] * m_hat / (v_hat.sqrt() + r["eps"])
        opt.step()
        for g, r in zip(groups, refs):
            assert rel_err(g["params"][0].detach(), r["p"]) < 1e-6


def test_adamw_first_step_moves_each_entry_by_lr(train):
    """Bias correction makes the first step lr * g / |g|: every entry moves by lr, against its gradient."""
    p = torch.nn.Parameter(torch.randn(6, 4))
    p0 = p.detach().clone()
    p.grad = torch.randn(6, 4)
    train.MuonAdamW([dict(kind="adamw", params=[p], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)]).step()
    assert torch.allclose(p.detach() - p0, -0.01 * p.grad.sign(), atol=1e-6)


def test_setup_optimizer_groups_and_rates(train):
    cfg = dict(vocab_size=256, seq_len=32, n_layer=2, n_embd=128, n_head=2, n_kv_head=2, head_dim=64,
               window_pattern="SL")
    model = train.build_model(cfg)
    opt = train.setup_optimizer(model)
    seen = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one group
    scale = (128 / 768) ** -0.5
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model.lm_head.weight)]["lr"] == pytest.approx(train.UNEMBEDDING_LR * scale)
    assert by_param[id(model.wte.weight)]["lr"] == pytest.approx(train.EMBEDDING_LR * scale)
    ve = next(iter(model.value_embeds.values())).weight
    assert by_param[id(ve)]["lr"] == pytest.approx(train.EMBEDDING_LR * scale)
    assert by_param[id(model.resid_lambdas)]["lr"] == pytest.approx(train.SCALAR_LR * 0.01 * scale)
    x0 = by_param[id(model.x0_lambdas)]
    assert x0["lr"] == pytest.approx(train.SCALAR_LR * scale) and x0["betas"] == (0.96, 0.95)
    for g in opt.param_groups:
        if g["kind"] == "adamw":
            assert g["weight_decay"] == 0.0 and g["eps"] == 1e-10
        else:
            assert len({p.shape for p in g["params"]}) == 1 and g["lr"] == train.MATRIX_LR
    muon = {id(p) for g in opt.param_groups if g["kind"] == "muon" for p in g["params"]}
    assert muon == {id(p) for p in model.blocks.parameters()}
