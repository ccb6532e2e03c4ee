"""Router logits in fp32: under bf16 autocast (CPU autocast here; CUDA casts the same ops), every
matrix product a router computes, and every score, weight and loss it returns, is float32. Routing
decisions (top-k ties, capacity cut-offs, Sinkhorn exponentials) are precision-sensitive."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

pytestmark = pytest.mark.usefixtures("one_thread")

# the ops autocast runs in low precision that a router may use for its logits
_MATMULS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.einsum, torch.bmm,
            torch.mm, torch.Tensor.mm, torch.Tensor.bmm, torch.addmm, torch.baddbmm}


class _MatmulDtypes(TorchFunctionMode):
    """Records the output dtype of every matrix product called inside the context."""

    def __init__(self):
        super().__init__()
        self.dtypes: list[tuple[str, torch.dtype]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MATMULS and isinstance(out, torch.Tensor):
            self.dtypes.append((getattr(func, "__name__", str(func)), out.dtype))
        return out


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_router_logits_are_float32_under_bf16_autocast(router_name, make_router, train):
    router = make_router(router_name)(dim=16, num_experts=4).train(train)
    x_GSD = torch.randn(2, 8, 16).to(torch.bfloat16)  # what a bf16 block hands the router
    kwargs = {"token_ids_GS": torch.randint(0, 50, (2, 8))} if router.needs_token_ids else {}
    seen = _MatmulDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16), seen:
        routing = router(x_GSD, None, **kwargs)
    if any(p.requires_grad for p in router.parameters()):
        assert seen.dtypes, "a learned router computed no logits?"
    assert all(dtype == torch.float32 for _, dtype in seen.dtypes), seen.dtypes
    for name in ("scores_GSE", "weight_N", "dispatch_GSEP", "combine_GSEP", "merge_GE", "residual_T"):
        value = getattr(routing, name)
        assert value is None or value.dtype == torch.float32, f"{name} is {value.dtype}"
    for name, loss in router.aux_losses.items():
        assert loss.dtype == torch.float32, f"aux loss {name} is {loss.dtype}"


def test_the_recorder_sees_bf16_products():
    """The check above can fail: a plain linear under the same autocast is recorded as bf16."""
    seen = _MatmulDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16), seen:
        F.linear(torch.randn(4, 8), torch.randn(3, 8))
    assert seen.dtypes == [("linear", torch.bfloat16)]
