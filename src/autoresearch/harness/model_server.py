"""The trained model, answering the lab's scorer from inside a sandbox.

    python -m autoresearch.harness.model_server TRAINER DEVICE SEQ_LEN VOCAB_SIZE

Run by the lab in a sandbox that holds train.py (the commit's), the checkpoint's folder, a private
temporary folder and the GPU, and no data. The lab starts it early, while the trainer starts up: it
starts CUDA, connects, says hello with the trial's key and waits, having run harness code only. When the lab
sends LOAD with the checkpoint's path, the model is rebuilt through train.py's `build_model(config)`,
its weights loaded from the checkpoint, and asked, batch by batch, for its logits: it answers the
log-sum-exp and the next token's logit at every position, and whole vectors where the scorer audits
(harness.scoring says why that is enough, and what the scorer checks). Nothing here decides
anything: whatever this process answers, the scorer checks and scores.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import torch

from . import wire
from .errors import HarnessError


def scoring_autocast(device: torch.device):
    """The precision models answer in: bf16 autocast on CUDA, as trained there; exact elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def load_trainer(path: Path):
    """Import the trainer script as a module (its training sits behind `__name__ == "__main__"`)."""
    spec = importlib.util.spec_from_file_location("trainer_under_evaluation", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise HarnessError(f"Importing train.py to rebuild its model failed: {type(e).__name__}: {e}") from e
    if not callable(getattr(module, "build_model", None)):
        raise HarnessError("train.py defines no build_model(config). The lab rebuilds the trained model through "
                           "it to score the checkpoint; keep that function in train.py.")
    return module


def load_model(trainer: Path, checkpoint: Path, device: torch.device) -> torch.nn.Module:
    module = load_trainer(trainer)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        config, weights = state["config"], state["state_dict"]
    except Exception as e:
        raise HarnessError(f"The checkpoint cannot be read safely ({type(e).__name__}: {e}).") from None
    with torch.device(device):
        model = module.build_model(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise HarnessError(
            f"The checkpoint does not fit build_model(config): missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]}. build_model must rebuild exactly the model that was trained.")
    return model.to(device).eval()


class LocalModel:
    """A torch model answering in this process (scoring.Model)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, vocab_size: int):
        self.model, self.device, self.vocab_size = model.eval(), device, vocab_size  # no dropout while scored
        self.last: torch.Tensor | None = None

    @torch.no_grad()
    def answer(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(self.device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        self.last = None
        with scoring_autocast(self.device):
            logits = self.model(inputs)
        if not isinstance(logits, torch.Tensor) or logits.shape != (*inputs.shape, self.vocab_size):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise HarnessError(f"The model returned {shape} for inputs of shape {tuple(inputs.shape)}; the lab "
                               f"needs logits of shape (batch, seq_len, {self.vocab_size}). model(inputs) must "
                               "return logits, not a loss.")
        self.last = logits.float()
        lse = torch.logsumexp(self.last, dim=-1)
        z = self.last.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return lse.cpu().numpy(), z.cpu().numpy()

    @torch.no_grad()
    def vectors(self, picks: list[tuple[int, int]]) -> np.ndarray:
        index = torch.tensor(picks, dtype=torch.int64, device=self.last.device).reshape(-1, 2)
        return self.last[index[:, 0], index[:, 1]].cpu().numpy()


def serve(sock, model: LocalModel, seq_len: int) -> None:
    """Answer SCORE and AUDIT requests until the scorer closes the connection."""
    while (message := wire.receive(sock)) is not None:
        if message.kind == wire.Kind.SCORE:
            rows = np.frombuffer(message.payload, dtype=np.uint16).reshape(int(message.fields["rows"]), seq_len + 1)
            lse, z = model.answer(rows)
            wire.send(sock, wire.Kind.SCORES, np.stack([lse, z]).astype(np.float32).tobytes())
        elif message.kind == wire.Kind.AUDIT:
            wire.send(sock, wire.Kind.VECTORS, model.vectors(message.fields["picks"]).astype(np.float32).tobytes())
        else:
            wire.send(sock, wire.Kind.ERROR, message=f"unexpected {message.kind}")


def main(argv: list[str] | None = None) -> int:
    trainer, device_name, seq_len, vocab_size = (argv or sys.argv[1:])[:4]
    if device_name == "cuda":  # while the trainer trains: CUDA and the kernels train.py imports, ready
        from .run import CUDA_KERNEL_MODULES, prepare

        prepare(CUDA_KERNEL_MODULES)
    sock = wire.connect(os.environ[wire.SOCKET_ENV], timeout=30)
    try:
        wire.send(sock, wire.Kind.HELLO, key=os.environ.get(wire.KEY_ENV))
        order = wire.receive(sock, max_payload=0)  # no code of train.py runs before the lab says so
        if order is None:
            return 0  # the lab had no checkpoint for it (the trial ended before)
        if order.kind != wire.Kind.LOAD:
            raise HarnessError(f"the lab sent {order.kind} where LOAD was due")
        device = torch.device(device_name)
        model = LocalModel(load_model(Path(trainer), Path(order.fields["checkpoint"]), device), device, int(vocab_size))
        params = sum(p.numel() for p in model.model.parameters())
        wire.send(sock, wire.Kind.READY, params=params)
        serve(sock, model, int(seq_len))
    except Exception as e:
        message = str(e) if isinstance(e, HarnessError) else f"{type(e).__name__}: {e}"
        traceback.print_exc()
        try:
            wire.send(sock, wire.Kind.ERROR, message=message[:2000])
        except OSError:
            pass
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
