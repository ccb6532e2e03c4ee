"""A new router is two files: its class and its config. Nothing in a domain or in core changes, and
the command line finds it through Hydra's search path (``hydra.searchpath``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import CONF_DIR

ROUTER = '''
"""Every token to expert 0 (a router for tests of the plumbing)."""
import torch

from core.routers.base import Router, select_token_choice


class FirstExpertRouter(Router):
    def forward(self, x_GSD, mask_GS=None, **kwargs):
        G, S, _ = x_GSD.shape
        scores_GSE = torch.zeros(G, S, self.num_experts, device=x_GSD.device)
        scores_GSE[..., 0] = 1.0
        self.aux_losses = {}
        return select_token_choice(scores_GSE, scores_GSE, 1, None, mask_GS=mask_GS)
'''

CONFIG = """
_target_: first_expert.FirstExpertRouter
_partial_: true
"""


def test_a_router_in_two_files_runs_in_a_domain(tmp_path):
    (tmp_path / "first_expert.py").write_text(textwrap.dedent(ROUTER))
    (tmp_path / "conf" / "router").mkdir(parents=True)
    (tmp_path / "conf" / "router" / "first_expert.yaml").write_text(CONFIG)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    res = subprocess.run([sys.executable, "-m", "vision.train", "debug=default", "trainer.max_steps=2",
                          "+router=first_expert", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                          f"hydra.run.dir={run_dir}"], cwd=CONF_DIR.parent, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["router"] == "first_expert" and metrics["steps"] == 2
    for layer in metrics["routing_layers"].values():
        tokens = layer["tokens_per_expert"]
        assert tokens[0] > 0 and not any(tokens[1:]), tokens
    assert "first_expert.FirstExpertRouter" in (run_dir / "config.yaml").read_text()
