"""The frozen harness: profiles, corpus sources, tokenizer, packing loader and the bpb metric.

train.py uses `start_run()`; everything else here is for `prepare`, the lab and the tests.
Names are imported on first use, so `autoresearch --help` does not pay for importing torch.
"""
from importlib import import_module

_EXPORTS = {
    "HarnessError": "errors",
    "PROFILES": "profiles", "Profile": "profiles", "get_profile": "profiles",
    "PreparedData": "dataset", "prepare": "dataset", "prepared_dir": "dataset",
    "evaluate_bpb": "metric",
    "Run": "session", "start_run": "session",
    "resolve_source": "sources",
    "render_trainer": "template",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
