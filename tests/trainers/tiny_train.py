"""A tiny but real trainer for the lab's tests: a bigram model trained for the budget.

It keeps train.py's contract (the lab's loader, training_started, save_checkpoint, build_model), so
the lab treats it exactly as the template; it just starts in a second. The tests derive
misbehaving variants from it by replacing marked lines.
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoresearch import harness

LR = 0.003  # Adam learning rate
DIM = 32  # embedding width
BATCH = 16  # rows per step
SEED = 0


class Bigram(nn.Module):
    def __init__(self, vocab_size, dim):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, idx):
        features = self.embed(idx)  # FEATURES
        return self.head(features)


def build_model(config):
    return Bigram(config["vocab_size"], config["dim"])


if __name__ == "__main__":
    run = harness.start_run()
    seed = run.seed(SEED)
    torch.manual_seed(seed)
    config = {"vocab_size": run.vocab_size, "dim": DIM}
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loader = run.train_loader(BATCH, seed)
    next(loader)  # a warm-up batch: random tokens, before the clock starts
    run.training_started()
    started, steps = time.time(), 0
    while time.time() - started < run.time_budget:  # BUDGET
        inputs, targets, _ = next(loader)
        logits = model(inputs)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    print(f"trained {steps} steps, loss {loss.item():.4f}")
    run.save_checkpoint(model, config, num_steps=steps, depth=1)
