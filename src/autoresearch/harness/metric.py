"""Validation bits per byte, computed by the harness from the model's logits.

The model is given inputs only, never targets: what it returns is scored here. Targets that carry
no bytes (special tokens) are left out; every other target counts its raw UTF-8 byte length.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .errors import HarnessError


def scoring_autocast(device: torch.device):
    """The precision the harness scores in: bf16 autocast on CUDA, as trained there; exact elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def evaluate_bpb(model: torch.nn.Module, rows: torch.Tensor, token_bytes: torch.Tensor, batch_size: int,
                 device: torch.device | str) -> float:
    """Sum of cross-entropy (nats) over targets with bytes, over ln 2 times the sum of their bytes.

    `rows` are (N, seq_len + 1) token rows; the sums run in float64 over the same rows whatever
    `batch_size` is, so the result does not depend on it.
    """
    device = torch.device(device)
    token_bytes = token_bytes.to(device)
    autocast = scoring_autocast(device)
    was_training = model.training
    model.eval()
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size].to(device, dtype=torch.int64, non_blocking=True)
            inputs, targets = batch[:, :-1], batch[:, 1:]
            with autocast:
                logits = model(inputs)
            vocab = len(token_bytes)
            if not isinstance(logits, torch.Tensor) or logits.shape != (*inputs.shape, vocab):
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise HarnessError(
                    f"The model returned {shape} for inputs of shape {tuple(inputs.shape)}; the harness "
                    f"needs logits of shape (batch, seq_len, {vocab}). model(inputs) must return logits, "
                    "not a loss."
                )
            nats = F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1), reduction="none")
            nbytes = token_bytes[targets.reshape(-1)]
            counted = nbytes > 0
            total_nats += nats[counted].double().sum()
            total_bytes += nbytes[counted].double().sum()
    finally:
        model.train(was_training)
    if total_bytes.item() == 0:
        raise HarnessError("The evaluation rows hold no bytes to score; the val split is empty.")
    bpb = total_nats.item() / (math.log(2) * total_bytes.item())
    if not math.isfinite(bpb):
        raise HarnessError("The model's logits gave a non-finite loss (NaN or inf) on the val split.")
    return bpb
