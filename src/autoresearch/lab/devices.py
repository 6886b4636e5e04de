"""The devices of this machine as the lab sees them, without importing torch or trusting a trainer:
GPUs from the NVIDIA driver's own listing, the CPU from /proc/cpuinfo.

A trial's device class (its GPU model, or the CPU's, and how many it used) is what the lab records
and compares runs within: a trainer cannot choose it by saying what it ran on.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


@dataclass(frozen=True)
class Gpu:
    index: int  # CUDA's index in PCI bus order (the lab sets CUDA_DEVICE_ORDER=PCI_BUS_ID)
    name: str
    minor: int | None  # /dev/nvidia<minor>
    bus: str
    uuid: str | None = None  # GPU-...: what CUDA_VISIBLE_DEVICES names it by, whichever nodes are bound


def gpus() -> list[Gpu]:
    """The GPUs the NVIDIA driver lists, in PCI bus order; [] without the driver."""
    if not NVIDIA_GPUS.is_dir():
        return []
    found = []
    for index, folder in enumerate(sorted(NVIDIA_GPUS.iterdir(), key=lambda p: p.name.lower())):
        info = {}
        try:
            for line in (folder / "information").read_text().splitlines():
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
        except OSError:
            continue
        minor = info.get("Device Minor")
        found.append(Gpu(index, info.get("Model", "NVIDIA GPU"), int(minor) if minor and minor.isdigit() else None,
                         folder.name, info.get("GPU UUID") or None))
    return found


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def device_class(device: str, gpu_names: list[str] | None = None, threads: int | None = None) -> str:
    """The class runs are compared within: 'NVIDIA H100 80GB HBM3', '2x NVIDIA H100 80GB HBM3', or
    'CPU Intel(R) Xeon(R) Processor (8 threads)'."""
    if device == "cuda" and gpu_names:
        name = gpu_names[0] if len(set(gpu_names)) == 1 else " + ".join(gpu_names)
        return name if len(gpu_names) == 1 else f"{len(gpu_names)}x {name}"
    return f"CPU {cpu_name()} ({threads or cpu_count()} threads)"
