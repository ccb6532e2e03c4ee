"""Every domain's ``train`` under ``torchrun`` (gloo, the debug overlay) with DDP or FSDP2
(``trainer.data_parallel``), the experts spread over the ranks or not, against the same run in one
process; and distributed checkpoints (``torch.distributed.checkpoint`` directories) resuming on
another number of ranks and another layout.

Tolerances on the final evaluation loss, by what legitimately differs between 2 ranks and 1:

- nlp, recsys: nothing but summation order. The routers draw no noise, losses are means whose
  per-rank terms the engine weights by each rank's share of the global batch, and the debug
  models' auxiliary losses are off or the gates are dense: ``rtol=1e-4`` (seen: ~1e-8).
- vision: the V-MoE router adds noise from a per-rank random stream, and its importance/load
  losses (weight 0.005) are computed on each rank's tokens: ``rtol=1e-2`` (seen: ~1e-3).
- multimodal: the CLIP loss gathers both ranks' features (global negatives, as in one process), but
  each rank draws its own captions and its own router noise: ``rtol=5e-2`` (seen: ~4e-4).

DDP and FSDP change nothing in these tolerances: both give the gradients of the global mean (seen:
nlp's final validation loss equal to one process's within 2e-8 with ddp, fsdp, fsdp+experts spread).

By default: the vision pair (DDP, experts spread) and its checkpoint resumed on one rank, and nlp's
FSDP + expert-parallel run whose checkpoint resumes on one process and on 2 ranks with the same next
loss. ``slow``: every domain with ddp and fsdp at 2 and 4 ranks, resuming on 4 ranks, torchrec's
sharded tables (a 2-rank run costs tens of seconds of process start and imports on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
RTOL = {"vision": 1e-2, "nlp": 1e-4, "recsys": 1e-4, "multimodal": 5e-2}
LOSS_KEY = {"vision": "test_loss", "nlp": "val_loss", "recsys": "val_loss", "multimodal": "val_loss"}


def _run(domain: str, run_dir: Path, *overrides: str, ranks: int = 1, timeout: int = 600):
    """``python -m <domain>.train debug=default`` in one process, or under torchrun with ``ranks``."""
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = [*launcher, "-m", f"{domain}.train", "debug=default", f"hydra.run.dir={run_dir}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-3000:]}"
    return json.loads((run_dir / "metrics.json").read_text())


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def _compare(domain: str, tmp: Path, mode: str = "ddp", ranks: int = 2, one: dict | None = None) -> tuple[dict, dict]:
    one = one or _run(domain, tmp / "one")
    two = _run(domain, tmp / "two", "trainer.expert_parallel=true", f"trainer.data_parallel={mode}", ranks=ranks)
    assert two["world_size"] == ranks and two["expert_parallel"] is True
    assert two["steps"] == one["steps"]  # the global batch, hence the schedule, does not depend on ranks
    key = LOSS_KEY[domain]
    assert two[key] == pytest.approx(one[key], rel=RTOL[domain]), (domain, one[key], two[key])
    # rank 0 alone writes: one history line per record, as in one process
    assert [r["step"] for r in _history(tmp / "two")] == [r["step"] for r in _history(tmp / "one")]
    assert two["params_total"] == one["params_total"]  # experts gathered back: the whole model
    return one, two


@pytest.fixture(scope="module")
def vision_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vision")
    one, two = _compare("vision", tmp)
    return tmp, one, two


def test_vision_two_ranks_expert_parallel_match_one_process(vision_runs):
    tmp, one, two = vision_runs
    # training loss summed over both ranks' halves follows the one-process curve
    first_one, first_two = _history(tmp / "one")[0]["loss"], _history(tmp / "two")[0]["loss"]
    assert first_two == pytest.approx(first_one, rel=RTOL["vision"])
    assert two["experts_per_token"] == pytest.approx(one["experts_per_token"], rel=0.05)


def _dcp_sizes(path: Path) -> dict:
    """``{key: global shape}`` of the tensors in a ``torch.distributed.checkpoint`` directory."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k: tuple(m.size) for k, m in meta.items() if hasattr(m, "size")}


def test_two_rank_checkpoint_resumes_on_one_rank(vision_runs):
    """The 2-rank run's previous checkpoint (step 30 of 32, mid-epoch) is a distributed checkpoint
    whose expert weights have their global shape (every expert, written as the ranks' shards); it
    resumes in one process and ends where the 2-rank run ended."""
    import torch

    from core.engine.checkpoint import MANIFEST, verify_distributed_checkpoint

    tmp, _, two = vision_runs
    prev = tmp / "two" / "checkpoints" / "prev.dcp"
    assert (prev / ".metadata").is_file() and (prev / MANIFEST).is_file()
    assert len(list(prev.glob("*.distcp"))) == 2  # one file per rank
    extra = verify_distributed_checkpoint(prev)
    assert extra["state"]["step"] == 30 and len(extra["rng_ranks"]) == 2 and extra["world_size"] == 2
    sizes = _dcp_sizes(prev)
    w1 = [v for k, v in sizes.items() if k.startswith("model.") and k.endswith("experts.w1_EDF")]
    assert w1 and all(shape[0] == 4 for shape in w1)  # every expert, not one rank's half
    assert any(k.startswith("optimizer.state.") and k.endswith("experts.w1_EDF.exp_avg") and v[0] == 4
               for k, v in sizes.items())
    resumed = _run("vision", tmp / "resumed", f"trainer.resume={prev}")
    assert resumed["steps"] == two["steps"] == 32
    assert "resumed from" in (tmp / "resumed" / "train.log").read_text()
    assert resumed["test_loss"] == pytest.approx(two["test_loss"], rel=RTOL["vision"])
    assert torch.load(tmp / "resumed" / "model.pt").keys() == torch.load(tmp / "two" / "model.pt").keys()


@pytest.fixture(scope="module")
def nlp_fsdp_run(tmp_path_factory):
    """``torchrun --nproc_per_node=2 -m nlp.train debug=default trainer.data_parallel=fsdp
    trainer.expert_parallel=true`` and the same run in one process."""
    tmp = tmp_path_factory.mktemp("nlp_fsdp")
    one, two = _compare("nlp", tmp, mode="fsdp")
    return tmp, one, two


def _next_loss(run_dir: Path, step: int) -> float:
    return next(r["loss"] for r in _history(run_dir) if r.get("step") == step and "loss" in r)


def test_fsdp_expert_parallel_checkpoint_resumes_on_one_process_like_on_two_ranks(nlp_fsdp_run):
    """The FSDP + expert-parallel run writes distributed checkpoints; its step-30 checkpoint resumes
    in one process and on 2 ranks with the same next loss (step 31), and both end where it ended."""
    tmp, one, two = nlp_fsdp_run
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=RTOL["nlp"])
    ckpts = tmp / "two" / "checkpoints"
    assert (ckpts / "last.dcp").is_dir() and (ckpts / "prev.dcp").is_dir() and not (ckpts / "last.ckpt").exists()
    prev = ckpts / "prev.dcp"
    log1 = ("trainer.log_every_steps=1",)
    single = _run("nlp", tmp / "resumed_one", f"trainer.resume={prev}", *log1)
    double = _run("nlp", tmp / "resumed_two", f"trainer.resume={prev}", "trainer.data_parallel=fsdp",
                  "trainer.expert_parallel=true", *log1, ranks=2)
    first_one, first_two = _next_loss(tmp / "resumed_one", 31), _next_loss(tmp / "resumed_two", 31)
    assert first_one == pytest.approx(first_two, rel=RTOL["nlp"])
    assert single["steps"] == double["steps"] == two["steps"] == 40
    assert single["val_loss"] == pytest.approx(two["val_loss"], rel=RTOL["nlp"])
    # the same layout resumes exactly: every rank's generators, shards and optimizer state come back
    assert double["val_loss"] == two["val_loss"]
    assert _next_loss(tmp / "resumed_two", 35) == _next_loss(tmp / "two", 35)


@pytest.mark.slow
def test_two_rank_fsdp_checkpoint_resumes_on_four_ranks_with_ddp(nlp_fsdp_run):
    """Resharding to another number of ranks and another layout: FSDP + experts over 2 ranks ->
    DDP, every expert on each of 4 ranks."""
    tmp, _, two = nlp_fsdp_run
    prev = tmp / "two" / "checkpoints" / "prev.dcp"
    four = _run("nlp", tmp / "resumed_four", f"trainer.resume={prev}", "trainer.data_parallel=ddp",
                "trainer.log_every_steps=1", ranks=4)
    assert four["steps"] == 40 and four["world_size"] == 4
    assert _next_loss(tmp / "resumed_four", 35) == pytest.approx(_next_loss(tmp / "two", 35), rel=RTOL["nlp"])
    assert four["val_loss"] == pytest.approx(two["val_loss"], rel=RTOL["nlp"])


@pytest.mark.slow
def test_experts_over_groups_of_two_of_four_ranks_with_fsdp(tmp_path):
    """A 2-D mesh (``trainer.expert_parallel_size=2`` of 4 ranks): each pair of ranks holds every
    expert once, FSDP shards each expert over the two pairs; the run equals one process, and its
    checkpoint resumes in one process on the same next loss as the one-process run's own resume."""
    one = _run("nlp", tmp_path / "one")
    four = _run("nlp", tmp_path / "four", "trainer.expert_parallel=true", "trainer.data_parallel=fsdp",
                "trainer.expert_parallel_size=2", ranks=4)
    assert four["world_size"] == 4 and four["val_loss"] == pytest.approx(one["val_loss"], rel=RTOL["nlp"])
    prev = tmp_path / "four" / "checkpoints" / "prev.dcp"
    sizes = _dcp_sizes(prev)
    assert all(v[0] == 4 for k, v in sizes.items() if k.startswith("model.") and k.endswith("experts.w1_EDF"))
    single = _run("nlp", tmp_path / "resumed", f"trainer.resume={prev}", "trainer.log_every_steps=1")
    own = _run("nlp", tmp_path / "one_resumed", f"trainer.resume={tmp_path / 'one' / 'checkpoints' / 'prev.ckpt'}",
               "trainer.log_every_steps=1")
    assert _next_loss(tmp_path / "resumed", 31) == pytest.approx(_next_loss(tmp_path / "one_resumed", 31),
                                                                  rel=RTOL["nlp"])
    assert single["val_loss"] == pytest.approx(own["val_loss"], rel=RTOL["nlp"])


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("domain", ["vision", "nlp", "recsys", "multimodal"])
def test_data_parallel_engines_match_one_process(domain, mode, ranks, tmp_path):
    """Each domain with DDP and FSDP2 (experts spread) at 2 and 4 ranks against one process."""
    _compare(domain, tmp_path, mode=mode, ranks=ranks)


@pytest.mark.slow
def test_one_rank_checkpoint_resumes_on_two_ranks(tmp_path):
    one = _run("nlp", tmp_path / "one")
    prev = tmp_path / "one" / "checkpoints" / "prev.ckpt"
    resumed = _run("nlp", tmp_path / "two", f"trainer.resume={prev}", "trainer.expert_parallel=true", ranks=2)
    assert resumed["steps"] == one["steps"]
    assert resumed["val_loss"] == pytest.approx(one["val_loss"], rel=RTOL["nlp"])


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["table_wise", "column_wise", "data_parallel"])
def test_recsys_tables_sharded_by_torchrec(sharding, tmp_path):
    """torchrec's DistributedModelParallel over 2 gloo ranks: the run finishes, checkpoints and
    model.pt hold whole tables (same keys and shapes as one process), and the 2-rank checkpoint
    resumes in one process. Data-parallel tables match one process (same optimizer); table- and
    column-wise tables train with fbgemm's fused CPU Adagrad instead of AdamW, so they only get a
    loose bound."""
    import torch

    from core.engine import load_checkpoint

    one = _run("recsys", tmp_path / "one")
    two = _run("recsys", tmp_path / "two", f"sharding={sharding}", ranks=2)
    assert two["world_size"] == 2 and two["params_total"] == one["params_total"]
    rtol = RTOL["recsys"] if sharding == "data_parallel" else 5e-2
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=rtol)
    whole = torch.load(tmp_path / "one" / "model.pt")
    saved = load_checkpoint(tmp_path / "two" / "checkpoints" / "prev.ckpt")["model"]  # torchrec tables: one file
    assert {k: tuple(v.shape) for k, v in saved.items()} == {k: tuple(v.shape) for k, v in whole.items()}
    resumed = _run("recsys", tmp_path / "resumed", f"trainer.resume={tmp_path / 'two' / 'checkpoints' / 'prev.ckpt'}")
    assert resumed["steps"] == two["steps"]
    assert "resumed from" in (tmp_path / "resumed" / "train.log").read_text()

