"""Whether two train.py files compute the same function on a CUDA GPU: the compiled loss and every
parameter's gradient, on the same weights and batch, at the reference configuration.

A rewrite meant only for speed (say, of RoPE) should differ from the original by bf16 rounding
alone. The first file is also run twice, which shows the run-to-run difference of its kernels.

    PYTHONPATH=src python bench/compare_gradients_gpu.py OLD_train.py NEW_train.py [--rows 16]
"""
import argparse

import torch
from bench_train_gpu import load_template, make_loss_fn  # a script beside this one

T, VOCAB = 2048, 8192


def loss_and_grads(train, state, x, y):
    with torch.device("cuda"):
        model = train.build_model(train.model_config(VOCAB, T))
    model.load_state_dict(state)
    autocast, kernels, _ = train.setup_device(model, torch.device("cuda"))
    with kernels, autocast:
        loss = make_loss_fn(train, model, torch.device("cuda"))(x, y)
    loss.backward()
    return loss.item(), {name: p.grad.float() for name, p in model.named_parameters()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rows", type=int, default=16, help="batch rows of 2048 tokens")
    args = ap.parse_args()
    torch.set_float32_matmul_precision("high")
    a, b = load_template(path=args.a, name="train_a"), load_template(path=args.b, name="train_b")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = a.build_model(a.model_config(VOCAB, T))
    with torch.no_grad():  # away from the initialisation, whose zero projections hide attention
        for name, p in model.named_parameters():
            if p.ndim == 2 and not name.startswith(("wte", "value_embeds")):
                p.normal_(std=0.5 * p.size(1) ** -0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = (torch.randint(0, VOCAB, (args.rows, T), device="cuda") for _ in range(2))
    loss_a, grads_a = loss_and_grads(a, state, x, y)
    loss_again, grads_again = loss_and_grads(a, state, x, y)
    loss_b, grads_b = loss_and_grads(b, state, x, y)
    print(f"loss: {loss_a:.6f} (a), {loss_again:.6f} (a again), {loss_b:.6f} (b)")
    print(f"{'parameter':40s} {'|grad|':>10s} {'a vs a':>9s} {'a vs b':>9s}   (relative norm of the difference)")
    worst_again = worst_b = 0.0
    for name, g in grads_a.items():
        again = ((g - grads_again[name]).norm() / g.norm()).item()
        other = ((g - grads_b[name]).norm() / g.norm()).item()
        worst_again, worst_b = max(worst_again, again), max(worst_b, other)
        print(f"{name:40s} {g.norm().item():10.3e} {again:9.2e} {other:9.2e}")
    print(f"worst: a vs a {worst_again:.2e}, a vs b {worst_b:.2e}")


if __name__ == "__main__":
    main()
