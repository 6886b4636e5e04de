"""The frozen harness: profiles, corpus sources, tokenizer, packing loader, the data feed and the scorer.

train.py uses `start_run()` (and `TrainingDiverged`, `peak_flops`, `device_name`); everything else here
is for `prepare`, the lab and the tests.
Names are imported on first use, so `autoresearch --help` does not pay for importing torch.
"""
from autoresearch._lazy import lazy_exports

_EXPORTS = {
    "HarnessError": "errors",
    "PROFILES": "profiles", "Profile": "profiles", "get_profile": "profiles",
    "PreparedData": "dataset", "prepare": "dataset", "prepared_dir": "dataset",
    "Run": "session", "start_run": "session",
    "TrainingDiverged": "run",
    "peak_flops": "hardware", "device_name": "hardware",
    "resolve_source": "sources",
    "render_trainer": "template",
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
