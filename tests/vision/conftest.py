"""Vision test helpers: the real Hydra config composed with the debug overlay."""

from __future__ import annotations

import pytest

from tests.conftest import compose


def compose_vision(*overrides: str):
    """``conf/vision/train.yaml`` with ``debug=default`` (digits, a 2-block width-32 V-MoE) plus overrides."""
    return compose("vision", "debug=default", *overrides)


@pytest.fixture
def vision_cfg(tmp_path):
    """``vision_cfg(*overrides)`` -> a debug config writing into a fresh temporary run directory."""
    def make(*overrides: str):
        return compose_vision(f"output_dir={tmp_path}", *overrides)
    return make
