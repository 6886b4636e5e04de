"""The harness as train.py sees it: one training run's profile, data, device, clock and outputs.

The lab sets what the harness owns through environment variables; train.py never chooses them:
  AUTORESEARCH_PROFILE      profile name (default: chosen from the machine)
  AUTORESEARCH_DATA         prepared data folder (default: the last one `prepare` made for the profile)
  AUTORESEARCH_DEVICE       cuda, mps or cpu (default: the best present)
  AUTORESEARCH_OUTPUT       where checkpoint.pt and result.json go (default: ./run_output)
  AUTORESEARCH_TIME_BUDGET  seconds of training, overriding the profile's (for tests and smoke runs)
  AUTORESEARCH_SEED         a seed the lab sets to repeat a run under another seed
  AUTORESEARCH_EVENTS_FD    a pipe on which the lab times the run with its own clock

The lab does not take the trainer's word for how long it trained: the harness tells it, as they
happen, when the first batch was drawn, when training proper started (after warm-up), and when the
checkpoint was written, and the lab timestamps each on arrival.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .dataset import PreparedData, current_data_dir
from .loader import TrainLoader, eval_rows
from .metric import evaluate_bpb
from .profiles import Profile, get_profile
from .storage import atomic_path, write_json

CHECKPOINT_FILE = "checkpoint.pt"
RESULT_FILE = "result.json"


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


@dataclass
class Run:
    profile: Profile
    data: PreparedData
    device: torch.device
    output_dir: Path
    time_budget: float
    seed_override: int | None = None
    events: object | None = field(default=None, repr=False)  # a writable text stream, or None
    _val_rows: torch.Tensor | None = field(default=None, repr=False)
    _token_bytes: torch.Tensor | None = field(default=None, repr=False)

    @property
    def seq_len(self) -> int:
        return self.profile.seq_len

    @property
    def vocab_size(self) -> int:
        return self.profile.vocab_size

    @property
    def bos_id(self) -> int:
        return self.data.tokenizer.bos_id

    @property
    def tokenizer(self):
        return self.data.tokenizer

    def seed(self, default: int) -> int:
        """The seed to use: the lab's when it repeats a run under another seed, else `default`."""
        return default if self.seed_override is None else self.seed_override

    def train_loader(self, batch_size: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        loader = TrainLoader(self.data.tokens("train"), self.data.doc_starts("train"), self.seq_len,
                             batch_size, self.bos_id, seed, self.device)

        def batches():
            first = next(loader)
            self._event("first_batch")
            yield first
            yield from loader

        return batches()

    def training_started(self) -> None:
        """Call once the warm-up steps are done: the budget counts from here, on the lab's clock too."""
        self._event("training_started")

    def _event(self, name: str) -> None:
        if self.events is not None:
            self.events.write(name + "\n")
            self.events.flush()

    def eval_rows(self, split: str = "val") -> torch.Tensor:
        return eval_rows(self.data.tokens(split), self.data.doc_starts(split), self.seq_len, self.bos_id,
                         self.profile.eval_rows)

    def token_bytes(self) -> torch.Tensor:
        if self._token_bytes is None:
            self._token_bytes = torch.from_numpy(self.data.tokenizer.token_bytes())
        return self._token_bytes

    def evaluate_bpb(self, model: torch.nn.Module, batch_size: int, split: str = "val") -> float:
        """val_bpb of `model` on the fixed validation rows. split="test" is for final reports only."""
        if split == "val":
            if self._val_rows is None:
                self._val_rows = self.eval_rows("val")
            rows = self._val_rows
        else:
            rows = self.eval_rows(split)
        return evaluate_bpb(model, rows, self.token_bytes(), batch_size, self.device)

    def save_checkpoint(self, model: torch.nn.Module, config: dict) -> Path:
        model = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        path = self.output_dir / CHECKPOINT_FILE
        with atomic_path(path) as tmp:
            torch.save({"config": config, "state_dict": state, "profile": self.profile.name}, tmp)
        self._event("checkpoint")
        return path

    def write_result(self, summary: dict) -> Path:
        path = self.output_dir / RESULT_FILE
        write_json(path, {**summary, "profile": self.profile.name, "device": str(self.device)})
        return path


def start_run() -> Run:
    """The run that train.py is part of, as the lab (or the environment) set it up."""
    env = os.environ
    device = torch.device(env.get("AUTORESEARCH_DEVICE") or default_device())
    profile = get_profile(env.get("AUTORESEARCH_PROFILE") or default_profile_name(device))
    data_dir = Path(env["AUTORESEARCH_DATA"]) if env.get("AUTORESEARCH_DATA") else current_data_dir(profile)
    data = PreparedData.open(data_dir, profile)
    output_dir = Path(env.get("AUTORESEARCH_OUTPUT") or "run_output")
    output_dir.mkdir(parents=True, exist_ok=True)
    budget = float(env.get("AUTORESEARCH_TIME_BUDGET") or profile.time_budget)
    seed = int(env["AUTORESEARCH_SEED"]) if env.get("AUTORESEARCH_SEED") else None
    events = None
    if env.get("AUTORESEARCH_EVENTS_FD"):
        events = os.fdopen(int(env["AUTORESEARCH_EVENTS_FD"]), "w", buffering=1)
    return Run(profile, data, device, output_dir, budget, seed, events)
