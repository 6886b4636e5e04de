"""The harness as train.py sees it: one training run's settings, its data, and its hand-in.

train.py runs inside the lab's sandbox and talks to the lab through one socket ($AUTORESEARCH_SOCKET):

    run = harness.start_run()                  # the run's profile, budget, seed and device, from the lab
    loader = run.train_loader(rows, seed)      # (inputs, targets, epoch) batches on the device
    run.training_started()                     # the lab's clock starts when this reaches it
    run.save_checkpoint(model, config, ...)    # the clock stops when the weights reach the lab

Before `training_started()` the loader yields random tokens of the right shape, to compile and warm
up on; after it, the training rows. The trainer never sees the validation or test tokens: the lab
scores the checkpoint itself. Run as a plain script (`python train.py`, no lab around it), the same
calls are served in-process from the prepared data, and the checkpoint is scored there too: handy
for trying train.py by hand, but no measurement.
"""
from __future__ import annotations

import io
import os
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import hardware, wire
from .errors import HarnessError
from .profiles import Profile

CHECKPOINT_FILE = "checkpoint.pt"
COMPILED_PREFIX = "_orig_mod."  # what torch.compile puts before the names of a compiled module's weights


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module build_model(config) rebuilds: without torch.compile's or DistributedDataParallel's wrapper
    (their parameter names would not match it)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


class LabConnection:
    """Request and answer over the lab's socket, one exchange at a time (the prefetching loader and
    the training loop share it)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()

    def request(self, kind: wire.Kind, payload: bytes | memoryview = b"", **fields) -> wire.Message:
        with self.lock:
            wire.send(self.sock, kind, payload, **fields)
            reply = wire.receive(self.sock)
        if reply is None:
            raise HarnessError("The lab closed the connection (the trial was stopped).")
        if reply.kind == wire.Kind.ERROR:
            raise HarnessError(f"The lab refused a request: {reply.fields.get('message')}")
        return reply


@dataclass
class Run:
    profile: Profile
    device: torch.device
    time_budget: float
    seq_len: int
    vocab_size: int
    bos_id: int
    lab: LabConnection = field(repr=False)
    seed_override: int | None = None
    rank: int = 0
    world_size: int = 1
    tokenizer_dir: Path | None = None
    started: bool = False

    def seed(self, default: int) -> int:
        """The seed to use: the lab's when it repeats a run under another seed, else `default`."""
        return default if self.seed_override is None else self.seed_override

    @property
    def tokenizer(self):
        from .tokenizer import load

        if self.tokenizer_dir is None:
            raise HarnessError("This run was given no tokenizer.")
        return load(self.tokenizer_dir, expected_vocab_size=self.vocab_size)

    def train_loader(self, batch_size: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Endless (inputs, targets, epoch) of shape (batch_size, seq_len) on the run's device. This
        rank's share of the rows: with k ranks, k times batch_size rows are drawn per call."""
        return Batches(self, batch_size, seed)

    def training_started(self) -> None:
        """Call once the warm-up (compilation) is done: the budget counts from here, on the lab's clock;
        from here the loader yields training rows."""
        self.lab.request(wire.Kind.START)
        self.started = True

    def save_checkpoint(self, model: torch.nn.Module, config: dict, **stats) -> None:
        """Hand the trained weights to the lab, which stops its clock when the last byte arrives and
        scores them. `stats` (num_steps, flops_per_token, depth...) go into the summary, for information."""
        model = unwrapped(model)
        state = {k.replace(COMPILED_PREFIX, ""): v.detach().cpu() for k, v in model.state_dict().items()}
        buffer = io.BytesIO()
        torch.save({"config": config, "state_dict": state, "profile": self.profile.name}, buffer)
        stats = {**stats, "peak_memory_mb": hardware.peak_memory_mb(self.device),
                 "device_name": hardware.device_name(self.device), "world_size": self.world_size}
        self.lab.request(wire.Kind.CHECKPOINT, buffer.getbuffer(), stats=stats)


class Batches:
    """The loader's iterator: asks the lab for the next rows while the caller trains on these."""

    def __init__(self, run: Run, batch_size: int, seed: int):
        self.run, self.batch_size, self.seed = run, batch_size, seed
        self.epoch = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autoresearch-rows")
        self._next: Future | None = None
        if run.device.type == "cuda":
            # Two pinned host buffers used in turn; an event says when the GPU has read one.
            self._host = [torch.empty((batch_size, run.seq_len + 1), dtype=torch.int32, pin_memory=True)
                          for _ in range(2)]
            self._copied = [torch.cuda.Event() for _ in range(2)]
            self._turn = 0

    def _fetch(self) -> tuple[np.ndarray, int, bool]:
        reply = self.run.lab.request(wire.Kind.BATCH, rows=self.batch_size, seed=self.seed, rank=self.run.rank)
        rows = np.frombuffer(reply.payload, dtype=np.uint16).reshape(self.batch_size, self.run.seq_len + 1)
        return rows, int(reply.fields["epoch"]), bool(reply.fields["training"])

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        pending, self._next = self._next, None
        rows, self.epoch, training = pending.result() if pending is not None else self._fetch()
        # Random rows after the start were fetched ahead during the warm-up or, on a rank other than 0, before
        # rank 0's start (which starts the lab's clock for every rank) reached the lab.
        while self.run.started and not training:
            rows, self.epoch, training = self._fetch()
        self._next = self._pool.submit(self._fetch)
        if self.run.device.type != "cuda":
            batch = torch.from_numpy(rows.astype(np.int64))
            return batch[:, :-1].contiguous().to(self.run.device), batch[:, 1:].contiguous().to(self.run.device), self.epoch
        host, copied = self._host[self._turn], self._copied[self._turn]
        self._turn ^= 1
        copied.synchronize()  # the GPU has read this buffer's previous batch
        np.copyto(host.numpy(), rows, casting="safe")
        on_device = host.to(self.run.device, non_blocking=True)
        copied.record()
        return on_device[:, :-1].long(), on_device[:, 1:].long(), self.epoch


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_profile_name(device: torch.device) -> str:
    if device.type == "cuda":
        big = torch.cuda.get_device_properties(device).total_memory >= 60 * 2**30
        return "h100" if big else "gpu24"
    return "gpu24" if device.type == "mps" else "cpu"


def start_run() -> Run:
    """The run that train.py is part of: the lab's, or, with no lab around, one served in-process."""
    rank, launched = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    path = os.environ.get(wire.SOCKET_ENV)
    if path:
        sock = wire.connect(path, timeout=30)
    elif launched > 1:
        raise HarnessError(f"Run by hand, with no lab around it, train.py trains on one process, not {launched}: "
                           "run it as `python train.py`. The lab runs a trial on several GPUs under torchrun "
                           "(the workspace's gpus_per_trial).")
    else:
        from .standalone import serve_in_process

        sock = serve_in_process()
    lab = LabConnection(sock)
    settings = lab.request(wire.Kind.HELLO, rank=rank, world_size=launched, key=os.environ.get(wire.KEY_ENV)).fields
    world_size = int(settings.get("world_size", 1))
    if "WORLD_SIZE" in os.environ and launched != world_size:
        raise HarnessError(f"The lab runs this trial on {world_size} process(es), and this is one of {launched}: "
                           "the lab starts train.py under torchrun itself.")
    device = torch.device(settings["device"])
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)  # what runs on "the current device" (events, streams) runs on this rank's
    profile = Profile(**settings["profile"])
    return Run(profile=profile, device=device, time_budget=float(settings["time_budget"]), seq_len=profile.seq_len,
               vocab_size=profile.vocab_size, bos_id=int(settings["bos_id"]), lab=lab,
               seed_override=settings.get("seed"), rank=rank, world_size=world_size,
               tokenizer_dir=Path(settings["tokenizer"]) if settings.get("tokenizer") else None)
