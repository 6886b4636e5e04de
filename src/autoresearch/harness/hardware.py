"""What the device is: its name, its dense bf16 peak (for MFU), the memory a process peaked at."""
from __future__ import annotations

import platform
import sys

# Dense bf16 peak FLOP/s by device name: (substrings of torch.cuda.get_device_name(), FLOP/s), first
# match wins. Unknown devices have no MFU.
PEAK_FLOPS = [
    (("H100", "PCIe"), 756e12),
    (("H100",), 989.5e12),
    (("H200",), 989.5e12),
    (("GH200",), 989.5e12),
    (("B200",), 2250e12),
    (("A100",), 312e12),
    (("L40S",), 362e12),
    (("L4",), 121e12),
    (("4090",), 165.2e12),
    (("3090",), 71e12),
]


def peak_flops(device_name: str | None) -> float:
    """Dense bf16 FLOP/s of a GPU by its name; 0 when unknown (a CPU, an unlisted GPU)."""
    if not device_name:
        return 0.0
    return next((flops for keys, flops in PEAK_FLOPS if all(k in device_name for k in keys)), 0.0)


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU {platform.processor() or platform.machine()}"


def peak_memory_mb(device) -> float:
    """The most memory this process held on `device`: allocated GPU memory, or the resident set on a CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def describe(device) -> dict:
    """The software and hardware a number was measured on."""
    import torch

    info = {"device": device.type, "name": device_name(device), "torch": torch.__version__,
            "python": sys.version.split()[0]}
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return info
