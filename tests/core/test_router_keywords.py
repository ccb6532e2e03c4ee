"""No silently ignored router option (issue 24): every keyword of every ``conf/router/*.yaml`` router,
changed from its config value to another allowed value, changes what the router does on some input
(its routing in training or evaluation, its auxiliary losses, or its state after
``after_optimizer_step`` and the routing that follows), or ``core.validate.check_router`` refuses
it, naming the key, in the configuration where it could not act.

The changed value follows the key's type (a float halved, or 0 made non-zero; an int plus one; a bool
flipped; None given a value; a string the other choice), with ``CHANGED`` where that rule does not fit.
A few keys act only in a context (a capacity, noise, the end of a schedule): ``CONTEXT`` sets it and
says why; ``REFUSED`` lists the configurations where such a key is refused instead.
"""

from __future__ import annotations

import inspect

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from core.checks import ConfigError
from core.stats import after_optimizer_step
from core.validate import check_router
from tests.conftest import router_config, router_names

pytestmark = pytest.mark.usefixtures("one_thread")

# G groups of S tokens: G >= 6 so that Lory's segments_per_sequence 4 -> 5 moves a sequence start into
# the input; S a multiple of E for BASE layers.
E, G, S, D = 8, 6, 32, 16

# Values for keys where the type rule gives none (None, strings) or one that this input cannot tell apart.
FROM_NONE = {"capacity_factor": 0.5, "threshold": 0.3}  # dropless -> a capacity; DS-MoE's evaluation threshold
CHANGED = {
    "score_func": "softmax",
    "eval_second_expert": "threshold",
    "first_segment": "self",
    "capacity_multiple_of": 7,       # 2 or 4 would leave this input's capacities (5, 8, 9) as they are
    "num_iters": 2,                  # 20 -> 21 Sinkhorn iterations: the plan has converged, the choices stay
}
CHANGED_FOR = {("hierarchical", "num_expert_groups"): 4}  # it must divide E = 8

# (router, key) -> other keys set on both sides, for keys that act only in that context.
_CAPACITY = {"capacity_factor": 0.5}      # capacity keys act only with a capacity (these routers are dropless)
_NOISE = {"noise_std": 1.0}               # the load loss is P(staying in the top-k under the noise): it needs noise
_SPARSE_PHASE = {"anneal_steps": 1}       # EvoMoE's top-k keys act once its dense-to-sparse schedule has ended
CONTEXT = {
    **{(r, k): _CAPACITY for r in ("adamoe", "deepseek", "hierarchical", "xmoe", "mixtral", "locmoe")
       for k in ("batch_priority", "capacity_multiple_of")},
    **{(r, "load_loss_weight"): _NOISE for r in ("mixtral", "locmoe")},
    ("evomoe", "load_loss_weight"): {**_NOISE, **_SPARSE_PHASE},
    **{("evomoe", k): _SPARSE_PHASE for k in ("top_k", "capacity_factor", "noise_std")},
    ("deepseek", "topk_group"): {"n_group": 4},  # topk_group <= n_group: it chooses among n_group > 1 groups
}
# DSelect-k's invalid-code penalty exists only when E is not a power of 2 (codes >= E name no expert).
NUM_EXPERTS = {("dselect_k", "invalid_code_weight"): 6}
# LocMoE+'s min_capacity is a floor under LocMoE's capacity bound, which starts far above it (half the
# group, at an angle estimate of pi/2) and falls as tokens gather round their experts: start it low.
ANGLE_ESTIMATE = {("locmoe_plus", "min_capacity"): 0.2}


def _keywords(name: str) -> list[str]:
    cls = hydra.utils.get_class(router_config(name)._target_)
    return [k for k in inspect.signature(cls).parameters if k not in ("dim", "num_experts")]


def _cases() -> list[tuple[str, str]]:
    return [(name, key) for name in router_names() for key in _keywords(name)]


def _changed(name: str, key: str, value):
    if (name, key) in CHANGED_FOR:
        return CHANGED_FOR[name, key]
    if key in CHANGED:
        return CHANGED[key]
    if value is None:
        return FROM_NONE[key]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        if value == 0.0:
            return 0.01 if key.endswith("weight") else 0.5
        return value * 0.5
    raise AssertionError(f"no changed value for {key}={value!r}: add one to CHANGED")


def _node(name: str, **changes):
    node = OmegaConf.create(OmegaConf.to_container(router_config(name)))
    for k, v in changes.items():
        node[k] = v
    return node


def _fields(routing) -> list:
    """What a routing decides (the diagnostics in ``extras`` left out)."""
    return [routing.token_idx_N, routing.expert_idx_N, routing.weight_N, routing.capacity, routing.num_choices,
            routing.scores_GSE, routing.dispatch_GSEP, routing.combine_GSEP, routing.merge_GE, routing.residual_T]


def _behaviour(name: str, num_experts: int = E, angle_estimate: float | None = None, **changes) -> list:
    """The router's training routing and losses, its state after an optimizer step, the next training
    routing, and its evaluation routing, on one fixed input (the same weights and noise draws)."""
    gen = torch.Generator().manual_seed(1)
    x_GSD = torch.randn(G, S, D, generator=gen)
    ids_GS = torch.randint(0, 1000, (G, S), generator=gen)
    torch.manual_seed(0)
    router = hydra.utils.instantiate(_node(name, **changes))(dim=D, num_experts=num_experts)
    if angle_estimate is not None:
        router.angle_estimate.fill_(angle_estimate)
    out = []
    router.train()
    for step in range(2):
        torch.manual_seed(10 + step)
        out += _fields(router(x_GSD, token_ids_GS=ids_GS))
        out += sorted((k, v.detach()) for k, v in router.aux_losses.items())
        after_optimizer_step(router)
        out += list(router.state_dict().items())
    router.eval()
    with torch.no_grad():
        out += _fields(router(x_GSD, token_ids_GS=ids_GS))
    return out


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and torch.equal(a, b))
    return a == b


@pytest.mark.parametrize("name,key", _cases())
def test_every_router_keyword_changes_the_routing(name, key, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = CONTEXT.get((name, key), {})
    num_experts = NUM_EXPERTS.get((name, key), E)
    angle = ANGLE_ESTIMATE.get((name, key))
    default = context.get(key, router_config(name)[key]) if key in router_config(name) else \
        inspect.signature(hydra.utils.get_class(router_config(name)._target_)).parameters[key].default
    value = _changed(name, key, default)
    # the config check accepts both (seq_len 60: Lory's 4 and 5 segments tile it)
    for node in (_node(name, **context), _node(name, **{**context, key: value})):
        check_router(node, num_experts, domain="nlp", token_ids=True, seq_len=60)
    before = _behaviour(name, num_experts, angle, **context)
    assert _same(before, _behaviour(name, num_experts, angle, **context)), f"{name}: not deterministic"
    after = _behaviour(name, num_experts, angle, **{**context, key: value})
    assert not _same(before, after), f"{name}: {key}={default!r} and {key}={value!r} route alike"


# Where a key could not act, check_router refuses it, naming the key (batch_priority without a capacity:
# tests/core/test_batch_priority.py).
_ROUNDING = r"capacity_factor=None is dropless and has no capacity to round"
_NO_NOISE = r"noise_std=0 adds none"
REFUSED = [
    *[(r, {"capacity_multiple_of": 4}, "capacity_multiple_of", _ROUNDING) for r in ("mixtral", "locmoe")],
    *[(r, {"capacity_factor": None, "capacity_multiple_of": 4}, "capacity_multiple_of", _ROUNDING)
      for r in ("topk", "switch", "gshard", "sinkhorn_token_choice", "sparse_token_choice")],
    *[(r, {"load_loss_weight": 0.01}, "load_loss_weight", _NO_NOISE) for r in ("mixtral", "locmoe", "evomoe")],
    ("topk", {"noise_std": 0.0}, "load_loss_weight", _NO_NOISE),
    ("sinkhorn_token_choice", {"noise_std": 0.0, "load_loss_weight": 0.01}, "load_loss_weight", _NO_NOISE),
    ("dselect_k", {"invalid_code_weight": 0.1}, "invalid_code_weight", r"num_experts=8 \(a power of 2\)"),
    ("locmoe", {"num_ranks": 1}, "local_bias", r"num_ranks=1 in one process has every expert local"),
    ("deepseek", {"topk_group": 2}, "topk_group", r"n_group=1 has no group-limited routing"),
]


@pytest.mark.parametrize("name,changes,key,reason", REFUSED, ids=[f"{r[0]}-{'-'.join(r[1])}" for r in REFUSED])
def test_a_key_that_could_not_act_is_refused(name, changes, key, reason, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=reason) as exc:
        check_router(_node(name, **changes), E, domain="nlp", token_ids=True)
    message = str(exc.value)
    assert exc.value.key == f"router.{key}" and "\n" not in message, message
    assert hydra.utils.get_class(router_config(name)._target_).__name__ in message, message


@pytest.mark.parametrize("name,changes,num_experts", [
    ("dselect_k", {"invalid_code_weight": 0.1}, 6),   # codes 6 and 7 name no expert: the penalty acts
    ("dselect_k", {"invalid_code_weight": 0.0}, 8),   # off is off, whatever E
    ("topk", {"noise_std": 0.0, "load_loss_weight": 0.0}, 8),
    ("mixtral", {"capacity_factor": 1.0, "capacity_multiple_of": 4}, 8),
    ("locmoe", {"num_ranks": 1, "local_bias": 0.0}, 8),
])
def test_the_same_keys_are_accepted_where_they_act(name, changes, num_experts, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_router(_node(name, **changes), num_experts, domain="nlp", token_ids=True)


def test_locmoe_ranks_in_a_distributed_launch(monkeypatch):
    """Distributed, LocMoE's ranks are the processes: num_ranks is not read (a changed value is refused),
    and the local bias acts whatever num_ranks says."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_router(_node("locmoe"), E, domain="nlp", token_ids=True)
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 processes .* never reads num_ranks") as exc:
        check_router(_node("locmoe", num_ranks=4), E, domain="nlp", token_ids=True)
    assert exc.value.key == "router.num_ranks"
