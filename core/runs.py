"""Run-directory and Hydra-choice helpers shared by the domains' ``train`` entry points (glue code:
model code never imports Hydra)."""

from __future__ import annotations

from pathlib import Path


def hydra_choice(group: str) -> str | None:
    """The option chosen for a config group in the running Hydra app (``+router=expert_choice`` ->
    ``"expert_choice"``), or None outside ``@hydra.main`` (tests composing configs directly)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def run_dir(explicit: str | Path | None, fallback: str | Path | None = None) -> Path:
    """Where a run writes: ``explicit`` when set, else Hydra's output directory, else ``fallback``
    (default: the working directory)."""
    if explicit:
        return Path(explicit)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(fallback) if fallback is not None else Path.cwd()


def machine_description(device: str = "cpu") -> str:
    """The hardware a run used, for results pages: the CPU model and the threads torch uses, or the
    GPU's name; plus the torch version."""
    import os
    import platform

    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        hw = torch.cuda.get_device_name(torch.device(device))
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        except OSError:
            pass
        hw = f"{cpu}, {torch.get_num_threads()} torch threads of {os.cpu_count()} CPUs"
    return f"{hw}; torch {torch.__version__}"
