"""The frozen harness: profiles, corpus sources, tokenizer, packing loader and the bpb metric.

train.py uses `start_run()`; everything else here is for `prepare`, the lab and the tests.
Names are imported on first use, so `autoresearch --help` does not pay for importing torch.
"""
from autoresearch._lazy import lazy_exports

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


__getattr__ = lazy_exports(__name__, _EXPORTS)
