"""Compute profiles: the frozen constants of one class of machine, chosen once per workspace."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    seq_len: int  # tokens per row seen by the model (rows hold seq_len + 1 tokens)
    time_budget: float  # seconds of training, warm-up steps excluded
    eval_tokens: int  # cap on validation tokens evaluated; a smaller val split is evaluated whole
    vocab_size: int  # including the special tokens
    default_source: str  # corpus used when `prepare` is given no --source
    # Values written over train.py's constants when a workspace is made for this profile, so that
    # the template's defaults (the h100 reference) fit the machine.
    trainer: dict = field(default_factory=dict)

    @property
    def eval_rows(self) -> int:
        return self.eval_tokens // self.seq_len


SPECIAL_TOKENS = ("<|bos|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>")  # BOS first
MIN_VAL_TOKENS = 100_000  # below this a validation split measures nothing worth deciding on

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in [
        Profile(
            name="h100",
            description="the reference: one H100, 300 s, sequence 2048, vocab 8192",
            seq_len=2048,
            time_budget=300.0,
            eval_tokens=40 * 524_288,
            vocab_size=8192,
            default_source="climbmix",
        ),
        Profile(
            name="gpu24",
            description="a 24 GB consumer GPU (RTX 3090/4090, L4): 300 s, sequence 1024, smaller batch",
            seq_len=1024,
            time_budget=300.0,
            eval_tokens=8 * 524_288,
            vocab_size=8192,
            default_source="climbmix",
            trainer={"DEPTH": 6, "DEVICE_BATCH_SIZE": 32, "TOTAL_BATCH_SIZE": 2**17, "WINDOW_PATTERN": "L"},
        ),
        Profile(
            name="cpu",
            description="a laptop or CI CPU: 60 s, sequence 256, vocab 2048, a tiny model",
            seq_len=256,
            time_budget=60.0,
            eval_tokens=131_072,
            vocab_size=2048,
            default_source="default",
            trainer={"DEPTH": 4, "ASPECT_RATIO": 32, "HEAD_DIM": 64, "WINDOW_PATTERN": "L",
                     "TOTAL_BATCH_SIZE": 4096, "DEVICE_BATCH_SIZE": 16},  # ~1.8M params, ~15k tokens/s on 2 cores
        ),
    ]
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of: {', '.join(PROFILES)}") from None
