"""Memory a model will need, checked against what the machine has before it is allocated.

A config such as ``model.num_experts=1000000`` or ``data.seq_len=100000000`` would otherwise allocate
until the operating system kills the process (or, with overcommit, until it swaps to a halt). The
modules that allocate size-dependent tensors call ``check_allocation`` first, and the run checks the
training state (weights, gradients and AdamW's two moments) before its first step; both refuse with
the estimate and the limit.
"""

from __future__ import annotations

import os

__all__ = ["available_bytes", "check_allocation", "format_bytes"]

# AdamW keeps weights, gradients and two moment estimates per parameter
TRAINING_COPIES = 4


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def available_bytes(device: str = "cpu") -> int | None:
    """Memory a new allocation can get: free plus reclaimable RAM (``MemAvailable``) on CPU, the
    device's free memory on CUDA; None when it cannot be read."""
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return int(free)
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_allocation(nbytes: float, what: str, key: str, value, device: str = "cpu") -> None:
    """Raise ``ValueError`` naming ``key=value`` when ``nbytes`` for ``what`` exceed the memory available
    on ``device`` (the message has ``core.checks``' form, so a config check can relabel the key)."""
    limit = available_bytes(device)
    if limit is None or nbytes <= limit:
        return
    raise ValueError(f"{key}={value!r} is not allowed: {what} would need {format_bytes(nbytes)}, and this machine "
                     f"has {format_bytes(limit)} of memory available; choose a smaller value.")
