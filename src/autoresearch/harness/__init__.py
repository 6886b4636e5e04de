"""The frozen harness: profiles, corpus sources, tokenizer, packing loader and the bpb metric.

train.py uses `start_run()`; everything else here is for `prepare`, the lab and the tests.
"""
from .dataset import PreparedData, prepare, prepared_dir
from .errors import HarnessError
from .metric import evaluate_bpb
from .profiles import PROFILES, Profile, get_profile
from .session import Run, start_run
from .sources import resolve_source
from .template import render_trainer

__all__ = [
    "HarnessError", "PROFILES", "PreparedData", "Profile", "Run", "evaluate_bpb", "get_profile", "prepare",
    "prepared_dir", "render_trainer", "resolve_source", "start_run",
]
