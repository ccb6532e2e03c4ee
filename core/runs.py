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
