"""Where and in what precision to run: device and dtype names of the command line, and timers
that wait for the device."""

from __future__ import annotations

import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""``--dtype`` names."""


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"``: the first CUDA device when there is one, else the CPU; otherwise ``name`` as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu (or auto).")
    return device


def device_name(device: torch.device) -> str:
    """A human name of ``device`` for result files (the GPU model, or the CPU's architecture)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """``time.perf_counter()`` after the queued work on ``device`` has finished."""
    synchronize(device)
    return time.perf_counter()
