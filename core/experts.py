"""Stacked FFN experts: all E experts' weights in single tensors, run on tokens grouped by expert.

``Experts.forward_routed`` computes ``out[t] = Σ_n w_n · FFN_{e_n}(x[t])`` over a routing's N
assignments with one autograd function whose backward is written out by hand, in two layouts:

- ``chunked`` (CPU default): the rows sorted by expert are taken expert by expert (large experts
  cut into blocks of at most R rows); each block is gathered into a reused buffer, multiplied,
  activated, multiplied again, scaled by its combine gates and added back to its tokens before
  the next block starts. The T·K×D gathered inputs and T·K×O expert outputs never exist as whole
  tensors, only the T·K×F hidden pre-activations the backward needs (the activations are
  recomputed from them block by block: for the MLP form about half of what the dense FFN of the
  same activated FLOPs keeps), in buffers reused from step to step once their backward has
  released them (``Workspace``); inference allocates nothing of size N at all. On CPU this makes
  the layer insensitive to the allocator: with glibc's default malloc every fresh N-sized buffer
  page-faults, which costs the other layouts up to a third of their speed. It is
  the CPU counterpart of fusing the gather and scatter into the GEMMs (ScatterMoE, Tan et al. 2024).
- ``grouped`` (GPU default): the same function on all rows at once with one grouped matmul per
  projection (``torch.nn.functional.grouped_mm``, as torchtitan's ``GroupedExperts``); no host sync.

Both apply the gate in place on the expert output, take its gradient as ``<dL/da, a>`` over the F
hidden units, gather x again in the backward instead of keeping the gathered copy, and skip bias
gathers when there are no biases. ``forward(x_ND_sorted, counts_E, expert_idx_N)`` (grouped matmul
under autograd) and ``forward_loop`` (one matmul pair per expert, Mixtral's eager path) are kept for
callers that sort rows themselves and as the reference.

Forms: MLP (``act(x W1 + b1) W2 + b2``, GELU/ReLU...) and GLU (``(act(x W1) ⊙ x W3) W2``, SwiGLU with
SiLU; Shazeer, "GLU Variants Improve Transformer", 2020).

Legend: T tokens, N rows (assignments), D input width, F hidden width, O output width, E experts,
M rows per expert (batched path), R rows per block (chunked layout).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import torch
from torch import nn

from core.memory import check_allocation
from core.routers.base import check_positive_int
from core.routing import count_ids

_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

IMPLS = ("auto", "chunked", "grouped", "loop")


def _uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init, per expert
    return nn.init.uniform_(t, -bound, bound)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's backward rejects
    the expanded (stride-0) gradient that a ``.sum()`` loss sends."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _ActKernels(NamedTuple):
    """An activation as two out-variant kernels: ``fwd(h, out)`` and ``bwd(grad, h, out)``."""
    fwd: Callable
    bwd: Callable


def _act_name(act: nn.Module) -> str | None:
    """The activations the fused function knows, by name (exact types only, so a subclass with a
    different forward falls back to autograd): ``gelu:<approximate>``, ``silu``, ``relu``, ``identity``."""
    if type(act) is nn.GELU:
        return f"gelu:{act.approximate}"
    return {nn.SiLU: "silu", nn.ReLU: "relu", nn.Identity: "identity"}.get(type(act))


@functools.lru_cache(maxsize=None)
def _kernels(name: str) -> _ActKernels:
    """Out-variant kernels of the activation named by ``_act_name``."""
    aten = torch.ops.aten
    if name.startswith("gelu:"):
        approx = name[len("gelu:"):]
        return _ActKernels(lambda h, out: aten.gelu.out(h, approximate=approx, out=out),
                           lambda g, h, out: aten.gelu_backward.grad_input(g, h, approximate=approx, grad_input=out))
    if name == "silu":
        return _ActKernels(lambda h, out: aten.silu.out(h, out=out),
                           lambda g, h, out: aten.silu_backward.grad_input(g, h, grad_input=out))
    if name == "relu":
        return _ActKernels(lambda h, out: torch.clamp_min(h, 0, out=out),
                           lambda g, h, out: aten.threshold_backward.grad_input(g, h, 0, grad_input=out))
    return _ActKernels(lambda h, out: out.copy_(h), lambda g, h, out: out.copy_(g))


def _act_kernels(act: nn.Module) -> _ActKernels | None:
    """Out-variant kernels for the activations the fused function knows, else None."""
    name = _act_name(act)
    return None if name is None else _kernels(name)


class _Plan(NamedTuple):
    """Assignments sorted by expert and cut into blocks of (expert, first row, rows); expert -1 marks
    one block over all rows run with grouped matmuls (``offs_E``, ``expert_N`` then set)."""
    order_N: torch.Tensor
    token_N: torch.Tensor
    expert_N: torch.Tensor | None
    offs_E: torch.Tensor | None
    blocks: list[tuple[int, int, int]]
    empty: list[int]
    num_tokens: int
    block_rows: int


def _plan(token_N: torch.Tensor, expert_N: torch.Tensor, num_experts: int, num_tokens: int,
          block_rows: int | None) -> _Plan:
    """Sort assignments by expert (stable: a deterministic order). ``block_rows`` None: one grouped
    block, no host sync; else every expert's rows cut into near-equal blocks of at most
    ``block_rows`` (one host sync for the counts)."""
    order_N = torch.argsort(expert_N, stable=True)
    token_sorted_N = token_N.index_select(0, order_N)
    N = token_N.shape[0]
    if block_rows is None:
        offs_E = torch.cumsum(torch.bincount(expert_N, minlength=num_experts), 0, dtype=torch.int32)
        return _Plan(order_N, token_sorted_N, expert_N.index_select(0, order_N), offs_E,
                     [(-1, 0, N)] if N else [], [], num_tokens, N)
    counts = torch.bincount(expert_N, minlength=num_experts).tolist()
    blocks, empty, start = [], [], 0
    for e, n in enumerate(counts):
        if n == 0:
            empty.append(e)
            continue
        pieces = -(-n // block_rows)
        size = -(-n // pieces)
        for s in range(start, start + n, size):
            blocks.append((e, s, min(size, start + n - s)))
        start += n
    rows = max((m for _, _, m in blocks), default=0)
    return _Plan(order_N, token_sorted_N, None, None, blocks, empty, num_tokens, rows)


def _lin(a: torch.Tensor, w_E: torch.Tensor, b_E: torch.Tensor | None, e: int, plan: _Plan,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """``a W_e (+ b_e)`` for a block of expert e; for e = -1 the grouped matmul over all experts."""
    if e >= 0:
        return torch.mm(a, w_E[e], out=out) if b_E is None else torch.addmm(b_E[e], a, w_E[e], out=out)
    y = _grouped_mm(a, w_E, offs=plan.offs_E)
    return y if b_E is None else y.add_(b_E.index_select(0, plan.expert_N))


def _wgrad(a: torch.Tensor, g: torch.Tensor, e: int, first: bool, plan: _Plan, d_E: torch.Tensor | None) -> torch.Tensor:
    """Weight gradient ``aᵀ g`` of expert e's block into ``d_E[e]`` (accumulated after the expert's
    first block); for e = -1 every expert's at once (returned)."""
    if e < 0:
        return _grouped_mm(a.t(), g, offs=plan.offs_E)
    if first:
        torch.mm(a.t(), g, out=d_E[e])
    else:
        d_E[e].addmm_(a.t(), g)
    return d_E


def _bgrad(g: torch.Tensor, e: int, plan: _Plan, d_E: torch.Tensor) -> None:
    """Bias gradient: the block's rows summed into expert e (e = -1: each row into its expert)."""
    if e >= 0:
        d_E[e] += g.sum(0)
    else:
        d_E.index_add_(0, plan.expert_N, g)


def _buffer(buf: torch.Tensor | None, e: int, m: int) -> torch.Tensor | None:
    """A block's slice of a reused buffer; grouped blocks (e = -1) allocate their own."""
    return None if (e < 0 or buf is None) else buf[:m]


_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class Workspace:
    """Reused memory for the N×F pre-activations (and GLU gates) that the chunked backward keeps.

    glibc maps every fresh buffer over 32 MiB anew and page-faults it on first touch (measured:
    about 7 ms for 32 MiB on the 2-core reference machine), once per training step for these
    tensors at benchmark sizes. A pooled buffer is handed out again only once nothing but the pool
    holds its storage: the autograd graph that saved it has released it (after its backward, or
    when the graph was dropped); a graph kept with ``retain_graph=True`` keeps its buffer. Up to
    ``max_buffers`` are pooled (one per forward still awaiting its backward, as in gradient
    accumulation); a free buffer of the wrong size, dtype or device is replaced, and past the limit
    buffers are plain allocations. ``clear()`` hands the memory back. Needs
    ``torch._C._storage_Use_Count`` (else it never pools); ``deepcopy`` and pickling give an empty
    workspace.
    """

    def __init__(self, max_buffers: int = 4):
        self.max_buffers = max_buffers
        self.buffers: list[torch.Tensor] = []
        self._free_count = None  # use count of a storage only the pool holds (its tensor + a temporary storage object)
        if _storage_use_count is not None:
            probe = torch.empty(1)
            storage = probe.untyped_storage()
            self._free_count = _storage_use_count(storage._cdata)

    def _is_free(self, buf: torch.Tensor) -> bool:
        storage = buf.untyped_storage()
        return _storage_use_count(storage._cdata) <= self._free_count

    def empty(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised rows×cols tensor with ``like``'s dtype and device."""
        numel = rows * cols
        if self._free_count is None or numel == 0:
            return like.new_empty(rows, cols)
        free = [i for i, b in enumerate(self.buffers) if self._is_free(b)]
        for i in free:
            buf = self.buffers[i]
            if buf.device == like.device and buf.dtype == like.dtype and numel <= buf.numel() <= 2 * numel:
                return buf[:numel].view(rows, cols)
        buf = like.new_empty(numel + numel // 16)  # headroom for routings whose N varies a little
        if free:
            self.buffers[free[0]] = buf
        elif len(self.buffers) < self.max_buffers:
            self.buffers.append(buf)
        return buf[:numel].view(rows, cols)

    def clear(self) -> None:
        self.buffers = []

    def __deepcopy__(self, memo):
        return Workspace(self.max_buffers)

    def __getstate__(self):
        return {"max_buffers": self.max_buffers}

    def __setstate__(self, state):
        self.__init__(state["max_buffers"])


def _routed_inference(x_TD, weight_N, w1, w2, w3, b1, b2, plan: _Plan, kern: _ActKernels) -> torch.Tensor:
    """Forward without autograd: with per-expert blocks every intermediate lives in one
    block-sized buffer reused by every block."""
    R, D, F, O = plan.block_rows, x_TD.shape[1], w1.shape[2], w2.shape[2]
    out_TO = x_TD.new_zeros(plan.num_tokens, O)
    per_expert = plan.offs_E is None
    buf_x, buf_h, buf_y = (x_TD.new_empty(R, D), x_TD.new_empty(R, F), x_TD.new_empty(R, O)) if per_expert else (None,) * 3
    buf_g = x_TD.new_empty(R, F) if (per_expert and w3 is not None) else None
    w_N1 = weight_N[:, None]
    for e, s, m in plan.blocks:
        tok = plan.token_N[s:s + m]
        x_c = torch.index_select(x_TD, 0, tok, out=_buffer(buf_x, e, m))
        h_c = _lin(x_c, w1, b1, e, plan, _buffer(buf_h, e, m))
        kern.fwd(h_c, h_c)
        if w3 is not None:
            h_c.mul_(_lin(x_c, w3, None, e, plan, _buffer(buf_g, e, m)))
        y_c = _lin(h_c, w2, b2, e, plan, _buffer(buf_y, e, m))
        out_TO.index_add_(0, tok, y_c.mul_(w_N1[s:s + m]))
    return out_TO


def _routed_forward(x_TD, weight_N, w1, w2, w3, b1, b2, plan: _Plan, kern: _ActKernels,
                    empty: Callable[[int, int, torch.Tensor], torch.Tensor]):
    """The forward of ``_RoutedExperts``: ``(out_TO, h_NF, a_NF, g_NF)``, the last three what the
    backward needs (None where the layout does not keep them); ``empty(rows, cols, like)`` gives the
    memory of the kept per-expert pre-activations."""
    N, R = plan.token_N.shape[0], plan.block_rows
    D, F, O = x_TD.shape[1], w1.shape[2], w2.shape[2]
    per_expert = plan.offs_E is None
    a_NF = None if per_expert else x_TD.new_empty(N, F)  # per-expert blocks recompute a in the backward
    h_NF = empty(N, F, x_TD) if per_expert else None
    g_NF = empty(N, F, x_TD) if (per_expert and w3 is not None) else None
    out_TO = x_TD.new_zeros(plan.num_tokens, O)
    buf_x, buf_a, buf_y = ((x_TD.new_empty(R, D), x_TD.new_empty(R, F), x_TD.new_empty(R, O)) if per_expert
                           else (None,) * 3)
    w_N1 = weight_N[:, None]
    for e, s, m in plan.blocks:
        tok = plan.token_N[s:s + m]
        x_c = torch.index_select(x_TD, 0, tok, out=_buffer(buf_x, e, m))
        h_c = _lin(x_c, w1, b1, e, plan, h_NF[s:s + m] if per_expert else None)
        if not per_expert:
            h_NF = h_c
        a_c = kern.fwd(h_c, _buffer(buf_a, e, m) if per_expert else a_NF)
        if w3 is not None:
            gate_c = _lin(x_c, w3, None, e, plan, g_NF[s:s + m] if per_expert else None)
            if not per_expert:
                g_NF = gate_c
            a_c.mul_(gate_c)
        y_c = _lin(a_c, w2, b2, e, plan, _buffer(buf_y, e, m))
        out_TO.index_add_(0, tok, y_c.mul_(w_N1[s:s + m]))
    return out_TO, h_NF, a_NF, g_NF


def _routed_backward(grad_TO, x_TD, weight_N, w1, w2, w3, b1, b2, h_NF, a_NF, g_NF, plan: _Plan,
                     kern: _ActKernels, needs: tuple[bool, ...]):
    """The backward of ``_RoutedExperts``: the gradients of (x, w, w1, w2, w3, b1, b2), None where
    ``needs`` is False."""
    need_x, need_w, need_w1, need_w2, need_w3, need_b1, need_b2 = needs
    grad_TO = grad_TO.contiguous()
    R, D, F, O = plan.block_rows, x_TD.shape[1], w1.shape[2], w2.shape[2]
    per_expert = plan.offs_E is None
    zeros = not plan.blocks  # no assignments: every weight gradient is zero
    new = x_TD.new_zeros if zeros else x_TD.new_empty
    dx_TD = x_TD.new_zeros(x_TD.shape) if need_x else None
    dw_N = new(weight_N.shape) if need_w else None
    dw1 = new(w1.shape) if need_w1 else None
    dw2 = new(w2.shape) if need_w2 else None
    dw3 = new(w3.shape) if need_w3 else None
    db1 = x_TD.new_zeros(b1.shape) if need_b1 else None
    db2 = x_TD.new_zeros(b2.shape) if need_b2 else None
    for d in (dw1, dw2, dw3):
        if d is not None and plan.empty:
            d[plan.empty] = 0
    buf = (lambda *shape: x_TD.new_empty(*shape)) if per_expert else (lambda *shape: None)
    buf_g, buf_da, buf_dh, buf_x, buf_dx = buf(R, O), buf(R, F), buf(R, F), buf(R, D), buf(R, D)
    buf_act, buf_a = (buf(R, F) if w3 is not None else None), buf(R, F)
    w_N1 = weight_N[:, None]
    last_e = None
    for e, s, m in plan.blocks:
        first, last_e = e != last_e, e
        tok, w_c, h_c = plan.token_N[s:s + m], w_N1[s:s + m], h_NF[s:s + m]
        act_c, a_c = None, a_NF
        if per_expert:  # a recomputed from h: a cache-resident block, no N×F trip through memory
            if w3 is not None:
                act_c = kern.fwd(h_c, _buffer(buf_act, e, m))
            if need_w or need_w2:  # a enters only the gate and W2 gradients
                a_c = (kern.fwd(h_c, _buffer(buf_a, e, m)) if w3 is None
                       else torch.mul(act_c, g_NF[s:s + m], out=_buffer(buf_a, e, m)))
        g_c = torch.index_select(grad_TO, 0, tok, out=_buffer(buf_g, e, m))
        da_c = _lin(g_c, w2.transpose(1, 2), None, e, plan, _buffer(buf_da, e, m))  # dL/da before the gate
        if need_w:
            dw = torch.sum(torch.mul(da_c, a_c, out=_buffer(buf_dh, e, m)), 1, out=dw_N[s:s + m])
            if b2 is not None:  # the expert output is a W2 + b2
                dw.add_(g_c @ b2[e] if e >= 0 else torch.linalg.vecdot(g_c, b2.index_select(0, plan.expert_N)))
        g_c.mul_(w_c)
        if need_w2:
            dw2 = _wgrad(a_c, g_c, e, first, plan, dw2)
        if need_b2:
            _bgrad(g_c, e, plan, db2)
        da_c.mul_(w_c)
        dgate_c = None
        if w3 is not None:
            dgate_c = (act_c if act_c is not None else kern.fwd(h_c, torch.empty_like(h_c))).mul_(da_c)
            da_c.mul_(g_NF[s:s + m])
        dh_c = kern.bwd(da_c, h_c, _buffer(buf_dh, e, m) if per_expert else da_c)
        if need_b1:
            _bgrad(dh_c, e, plan, db1)
        if need_w1 or need_w3:
            x_c = torch.index_select(x_TD, 0, tok, out=_buffer(buf_x, e, m))
            if need_w1:
                dw1 = _wgrad(x_c, dh_c, e, first, plan, dw1)
            if need_w3:
                dw3 = _wgrad(x_c, dgate_c, e, first, plan, dw3)
        if need_x:
            dx_c = _lin(dh_c, w1.transpose(1, 2), None, e, plan, _buffer(buf_dx, e, m))
            if w3 is not None:
                dx_c.add_(_lin(dgate_c, w3.transpose(1, 2), None, e, plan)) if e < 0 else dx_c.addmm_(dgate_c, w3[e].t())
            dx_TD.index_add_(0, tok, dx_c)
    return dx_TD, dw_N, dw1, dw2, dw3, db1, db2


class _RoutedExperts(torch.autograd.Function):
    """``out[t] = Σ_{n: token_n = t} w_n · FFN_{e_n}(x[t])`` block by block, with its backward.

    Saved for backward: x itself and the hidden pre-activations (N×F; GLU adds the gate; the
    grouped layout also keeps the activations), never the gathered inputs or the expert outputs:
    the backward gathers each block of x and of the output gradient again and recomputes the
    block's activations from its pre-activations (with per-expert blocks, cache-resident copies
    instead of trips through main memory). The combine gate is applied to the block output in
    place, and its gradient is ``<dL/da, a>`` over the F hidden units (``+ <g, b2>``), so no N×O
    tensor is kept.
    """

    @staticmethod
    def forward(ctx, x_TD, weight_N, w1, w2, w3, b1, b2, plan: _Plan, kern: _ActKernels, workspace: Workspace):
        out_TO, h_NF, a_NF, g_NF = _routed_forward(x_TD, weight_N, w1, w2, w3, b1, b2, plan, kern, workspace.empty)
        ctx.save_for_backward(x_TD, weight_N, w1, w2, w3, b1, b2, h_NF, a_NF, g_NF)
        ctx.plan, ctx.kern = plan, kern
        return out_TO

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_TO):
        saved = ctx.saved_tensors
        return (*_routed_backward(grad_TO, *saved, ctx.plan, ctx.kern, tuple(ctx.needs_input_grad[:7])),
                None, None, None)


# Under torch.compile the fused function is one opaque operator per direction: Dynamo cannot trace
# the host-synced plan, the reused buffers and the out= kernels of an autograd.Function (their
# aliasing breaks its capture), but it passes a custom op through without a graph break. The op
# recomputes the plan from the unsorted assignments in both directions and allocates its buffers
# afresh; block_rows 0 is the grouped layout.

def _kept_shapes(N: int, F: int, save: bool, block_rows: int, glu: bool) -> list[tuple[int, ...]]:
    """Shapes of the op's saved outputs h, a, g (N×F where the layout keeps one, else empty)."""
    return [(N, F) if keep else (0,) for keep in (save, save and block_rows == 0, save and glu)]


@torch.library.custom_op("moe_suite::routed_experts", mutates_args=(), schema=(
    "(Tensor x, Tensor weight, Tensor token_idx, Tensor expert_idx, Tensor w1, Tensor w2, Tensor? w3, "
    "Tensor? b1, Tensor? b2, str act, int block_rows, bool save) -> (Tensor, Tensor, Tensor, Tensor)"))
def _routed_op(x_TD, weight_N, token_idx_N, expert_idx_N, w1, w2, w3, b1, b2, act, block_rows, save):
    """``(out_TO, h, a, g)``: the fused function's output and what its backward needs."""
    plan = _plan(token_idx_N, expert_idx_N, w1.shape[0], x_TD.shape[0], block_rows or None)
    w_N, kern = weight_N.index_select(0, plan.order_N), _kernels(act)
    if not save:
        kept = (None,) * 3
        out_TO = _routed_inference(x_TD, w_N, w1, w2, w3, b1, b2, plan, kern)
    else:
        out_TO, *kept = _routed_forward(x_TD, w_N, w1, w2, w3, b1, b2, plan, kern,
                                        lambda rows, cols, like: like.new_empty(rows, cols))
    shapes = _kept_shapes(token_idx_N.shape[0], w1.shape[2], save, block_rows, w3 is not None)
    return (out_TO, *(t if t is not None else x_TD.new_empty(shape) for t, shape in zip(kept, shapes)))


@_routed_op.register_fake
def _(x_TD, weight_N, token_idx_N, expert_idx_N, w1, w2, w3, b1, b2, act, block_rows, save):
    shapes = _kept_shapes(token_idx_N.shape[0], w1.shape[2], save, block_rows, w3 is not None)
    return (x_TD.new_empty(x_TD.shape[0], w2.shape[2]), *(x_TD.new_empty(shape) for shape in shapes))


@torch.library.custom_op("moe_suite::routed_experts_backward", mutates_args=(), schema=(
    "(Tensor grad, Tensor x, Tensor weight, Tensor token_idx, Tensor expert_idx, Tensor w1, Tensor w2, "
    "Tensor? w3, Tensor? b1, Tensor? b2, Tensor h, Tensor a, Tensor g, str act, int block_rows, "
    "bool[] needs) -> Tensor[]"))
def _routed_backward_op(grad_TO, x_TD, weight_N, token_idx_N, expert_idx_N, w1, w2, w3, b1, b2, h_NF, a_NF, g_NF,
                        act, block_rows, needs):
    """Gradients of (x, weight, w1, w2, w3, b1, b2); an empty tensor where ``needs`` is False."""
    plan = _plan(token_idx_N, expert_idx_N, w1.shape[0], x_TD.shape[0], block_rows or None)
    grads = list(_routed_backward(grad_TO.contiguous(), x_TD, weight_N.index_select(0, plan.order_N), w1, w2, w3,
                                  b1, b2, h_NF, a_NF if block_rows == 0 else None, g_NF if w3 is not None else None,
                                  plan, _kernels(act), tuple(needs)))
    if grads[1] is not None:  # the gate gradient back in the callers' (unsorted) order
        grads[1] = torch.empty_like(grads[1]).index_copy_(0, plan.order_N, grads[1])
    return [g if g is not None else x_TD.new_empty(0) for g in grads]


@_routed_backward_op.register_fake
def _(grad_TO, x_TD, weight_N, token_idx_N, expert_idx_N, w1, w2, w3, b1, b2, h_NF, a_NF, g_NF, act, block_rows,
      needs):
    wrt = (x_TD, weight_N, w1, w2, w3, b1, b2)
    return [t.new_empty(t.shape) if need and t is not None else x_TD.new_empty(0) for t, need in zip(wrt, needs)]


def _routed_op_setup(ctx, inputs, output):
    x_TD, weight_N, token_idx_N, expert_idx_N, w1, w2, w3, b1, b2, act, block_rows, _ = inputs
    ctx.save_for_backward(x_TD, weight_N, token_idx_N, expert_idx_N, w1, w2, w3, b1, b2, *output[1:])
    ctx.act, ctx.block_rows = act, block_rows


def _routed_op_backward(ctx, grad_TO, *_):
    needs = [ctx.needs_input_grad[i] for i in (0, 1, 4, 5, 6, 7, 8)]
    grads = torch.ops.moe_suite.routed_experts_backward(grad_TO, *ctx.saved_tensors, ctx.act, ctx.block_rows, needs)
    dx, dw, dw1, dw2, dw3, db1, db2 = (g if need else None for g, need in zip(grads, needs))
    return dx, dw, None, None, dw1, dw2, dw3, db1, db2, None, None, None


_routed_op.register_autograd(_routed_op_backward, setup_context=_routed_op_setup)


def dispatch_combine(experts: nn.Module, x_TD: torch.Tensor, token_idx_N: torch.Tensor,
                     expert_idx_N: torch.Tensor, weight_N: torch.Tensor) -> torch.Tensor:
    """``out[t] = Σ_{n: token_n = t} w_n · expert_{e_n}(x[t])`` through any experts module with the
    sorted-rows interface ``experts(x_ND_sorted, counts_E, expert_idx_N)``: sort by expert, gather,
    run, scale and scatter-add back (T×O)."""
    order_N = torch.argsort(expert_idx_N, stable=True)
    token_N = token_idx_N.index_select(0, order_N)
    expert_N = expert_idx_N.index_select(0, order_N)
    counts_E = count_ids(expert_idx_N, experts.num_experts)
    y_NO = experts(x_TD.index_select(0, token_N), counts_E, expert_N)
    y_NO = y_NO * weight_N.index_select(0, order_N).to(y_NO.dtype)[:, None]
    return y_NO.new_zeros(x_TD.shape[0], y_NO.shape[1]).index_add_(0, token_N, y_NO)


class Experts(nn.Module):
    """E feed-forward experts with stacked weights.

    Args:
        num_experts: E.
        in_features: D.
        hidden_features: F, each expert's hidden width.
        out_features: O (default D).
        act_layer: activation class (``nn.GELU``; ``nn.SiLU`` for SwiGLU).
        glu: gated linear unit form (adds ``w3``).
        bias: biases on both projections (timm ``Mlp`` compatible; needed to upcycle a timm MLP).
        drop: dropout after the activation and after the output projection.
        norm_layer: optional norm on the hidden activations (timm ``Mlp``'s ``norm_layer``).
        impl: ``"auto"`` (the fused function when the activation is GELU/SiLU/ReLU/Identity, there
            is no norm layer and no active dropout: chunked on CPU, grouped on GPU when the widths
            meet grouped_mm's 16-byte stride rule; otherwise sort + ``forward`` under autograd),
            ``"chunked"``, ``"grouped"`` or ``"loop"`` (the reference, also for ``forward``).
        block_rows: R, rows per block of the chunked engine (None: 2 MiB of gathered rows, at
            least 256 rows; an expert with more rows is split into near-equal blocks).
    """

    def __init__(self, num_experts: int, in_features: int, hidden_features: int, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, glu: bool = False, bias: bool = True, drop: float = 0.0,
                 norm_layer: type[nn.Module] | None = None, impl: str = "auto", device=None, dtype=None, *,
                 block_rows: int | None = None):
        super().__init__()
        E = check_positive_int("num_experts", num_experts)
        D = check_positive_int("in_features", in_features)
        F = check_positive_int("hidden_features", hidden_features)
        O = check_positive_int("out_features", out_features or in_features)
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} is not allowed: use one of {', '.join(map(repr, IMPLS))}.")
        if block_rows is not None:
            check_positive_int("block_rows", block_rows)
        self.num_experts, self.in_features, self.hidden_features, self.out_features = E, D, F, O
        self.glu, self.impl = glu, impl
        self.block_rows = block_rows or max(256, (1 << 21) // max(D, O))
        self.cpu_engine = "chunked"  # the layout impl="auto" uses on CPU
        self.workspace = Workspace()  # the chunked backward's saved pre-activations, reused across steps
        dd = {"device": device, "dtype": dtype}
        n_params = E * (D * F * (3 if glu else 2) + (F + O if bias else 0))
        item = torch.empty((), dtype=dtype).element_size()
        where = str(device or torch.get_default_device())
        if where != "meta":  # before allocating: a huge E must not run the machine out of memory
            check_allocation(n_params * item, f"{E} experts of {D}x{F} ({n_params:,} weights)", "num_experts", E,
                             device=where)
        self.w1_EDF = nn.Parameter(_uniform_(torch.empty(E, D, F, **dd), D))
        self.w2_EFO = nn.Parameter(_uniform_(torch.empty(E, F, O, **dd), F))
        self.w3_EDF = nn.Parameter(_uniform_(torch.empty(E, D, F, **dd), D)) if glu else None
        self.b1_EF = nn.Parameter(_uniform_(torch.empty(E, F, **dd), D)) if bias else None
        self.b2_EO = nn.Parameter(_uniform_(torch.empty(E, O, **dd), F)) if bias else None
        self.act = act_layer()
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.norm = norm_layer(F) if norm_layer is not None else nn.Identity()
        if impl == "chunked" and not self._fusable():
            raise ValueError(f"impl='chunked' is not allowed with act_layer={act_layer.__name__} and "
                             f"norm_layer={norm_layer}: it needs GELU, SiLU, ReLU or Identity and no norm layer.")

    def _fusable(self) -> bool:
        """The fused engines need an activation with known kernels and no norm layer."""
        return _act_name(self.act) is not None and isinstance(self.norm, nn.Identity)

    def _hidden(self, h_NF: torch.Tensor, g_NF: torch.Tensor | None) -> torch.Tensor:
        h_NF = self.act(h_NF) if g_NF is None else self.act(h_NF) * g_NF
        return self.norm(self.drop(h_NF))

    def grouped_ok(self, x_ND: torch.Tensor) -> bool:
        """grouped_mm needs 16-byte aligned strides: widths that are multiples of 16/itemsize."""
        if _grouped_mm is None:
            return False
        step = 16 // x_ND.element_size()
        return all(w % step == 0 for w in (self.in_features, self.hidden_features, self.out_features))

    def engine(self, x: torch.Tensor) -> str:
        """How ``forward_routed`` runs for input x: ``chunked`` or ``grouped`` (the fused function,
        per-expert blocks or one grouped block), else ``composed`` (sort, gather, ``forward``,
        scatter: grouped_mm or the loop inside, autograd throughout)."""
        dropout_on = self.training and isinstance(self.drop, nn.Dropout)
        if self.impl == "loop" or not self._fusable() or dropout_on:
            return "composed"
        grouped = self.grouped_ok(x)
        if self.impl == "chunked" or (self.impl == "grouped" and not grouped):
            return "chunked" if self.impl == "chunked" else "composed"
        if self.impl == "grouped":
            return "grouped"
        if x.device.type == "cpu":
            return self.cpu_engine
        return "grouped" if grouped else "chunked"

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        dev = x.device.type
        if torch.is_autocast_enabled(dev) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
            return torch.get_autocast_dtype(dev)
        return x.dtype

    def forward_routed(self, x_TD: torch.Tensor, token_idx_N: torch.Tensor, expert_idx_N: torch.Tensor,
                       weight_N: torch.Tensor) -> torch.Tensor:
        """``out[t] = Σ_{n: token_n = t} w_n · expert_{e_n}(x[t])`` for N assignments (any order).

        x_TD: T×D; token_idx_N, expert_idx_N: int64 (N); weight_N: combine gates (N). Returns T×O in
        the autocast dtype when autocast is on, else in x's dtype.
        """
        engine = self.engine(x_TD)
        if engine == "composed":
            return dispatch_combine(self, x_TD, token_idx_N, expert_idx_N, weight_N)
        dt = self._compute_dtype(x_TD)
        block_rows = self.block_rows if engine == "chunked" else None
        params = [None if p is None else p.to(dt) for p in (self.w1_EDF, self.w2_EFO, self.w3_EDF, self.b1_EF, self.b2_EO)]
        x_TD = x_TD.to(dt).contiguous()
        if torch.compiler.is_compiling():
            w_N = weight_N.to(dt)
            save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in [x_TD, w_N, *params])
            with torch.autocast(x_TD.device.type, enabled=False):
                return torch.ops.moe_suite.routed_experts(x_TD, w_N, token_idx_N, expert_idx_N, *params,
                                                          _act_name(self.act), block_rows or 0, save)[0]
        plan = _plan(token_idx_N, expert_idx_N, self.num_experts, x_TD.shape[0], block_rows)
        w_N = weight_N.index_select(0, plan.order_N).to(dt)
        kern = _act_kernels(self.act)
        with torch.autocast(x_TD.device.type, enabled=False):
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in [x_TD, w_N, *params]):
                return _RoutedExperts.apply(x_TD, w_N, *params, plan, kern, self.workspace)
            return _routed_inference(x_TD, w_N, *params, plan, kern)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, expert_idx_N: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of ``x_ND`` sorted by expert, ``counts_E`` rows each; ``expert_idx_N`` (the sorted
        expert ids) is needed only with biases. Returns N×O (grouped matmul, or the loop)."""
        use_grouped = self.impl in ("grouped", "chunked") or (self.impl == "auto" and self.grouped_ok(x_ND))
        # under torch.compile grouped_mm's shape function accepts bf16 only (the CPU kernel also fp32)
        compiled_fp32 = torch.compiler.is_compiling() and x_ND.dtype != torch.bfloat16
        if not use_grouped or x_ND.shape[0] == 0 or not self.grouped_ok(x_ND) or compiled_fp32:
            return self.forward_loop(x_ND, counts_E)
        x_ND = x_ND.contiguous()
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        dt = x_ND.dtype
        h_NF = _ContiguousGrad.apply(_grouped_mm(x_ND, self.w1_EDF.to(dt), offs=offs_E))
        if self.b1_EF is not None:
            h_NF = h_NF + self.b1_EF.to(dt).index_select(0, expert_idx_N)
        g_NF = None
        if self.w3_EDF is not None:
            g_NF = _ContiguousGrad.apply(_grouped_mm(x_ND, self.w3_EDF.to(dt), offs=offs_E))
        y_NO = _grouped_mm(self._hidden(h_NF, g_NF).contiguous(), self.w2_EFO.to(dt), offs=offs_E)
        y_NO = _ContiguousGrad.apply(y_NO)
        if self.b2_EO is not None:
            y_NO = y_NO + self.b2_EO.to(dt).index_select(0, expert_idx_N)
        return self.drop(y_NO)

    def forward_loop(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Reference path: one matmul pair per expert over its slice of rows."""
        outs = []
        start = 0
        for e, n in enumerate(counts_E.tolist()):
            outs.append(self.forward_expert(e, x_ND[start:start + n]))
            start += n
        if not outs:
            return x_ND.new_zeros(0, self.out_features)
        return torch.cat(outs, 0)

    def forward_expert(self, e: int, x_MD: torch.Tensor) -> torch.Tensor:
        """Expert e alone on M rows."""
        h = x_MD @ self.w1_EDF[e].to(x_MD.dtype)
        if self.b1_EF is not None:
            h = h + self.b1_EF[e].to(x_MD.dtype)
        g = None if self.w3_EDF is None else x_MD @ self.w3_EDF[e].to(x_MD.dtype)
        y = self._hidden(h, g) @ self.w2_EFO[e].to(x_MD.dtype)
        if self.b2_EO is not None:
            y = y + self.b2_EO[e].to(x_MD.dtype)
        return self.drop(y)

    def forward_batched(self, x_EMD: torch.Tensor) -> torch.Tensor:
        """Every expert on its own M rows (Soft MoE slots, capacity buffers): batched matmuls."""
        dt = x_EMD.dtype
        h = torch.bmm(x_EMD, self.w1_EDF.to(dt))
        if self.b1_EF is not None:
            h = h + self.b1_EF.to(dt)[:, None, :]
        g = None if self.w3_EDF is None else torch.bmm(x_EMD, self.w3_EDF.to(dt))
        y = torch.bmm(self._hidden(h, g), self.w2_EFO.to(dt))
        if self.b2_EO is not None:
            y = y + self.b2_EO.to(dt)[:, None, :]
        return self.drop(y)

    def forward_merged(self, x_GSD: torch.Tensor, merge_GE: torch.Tensor) -> torch.Tensor:
        """One FFN per group whose parameters are ``Σ_e merge[g,e]·θ_e`` (SMEAR, Muqeeth et al.
        2023; Lory, Zhong et al. 2024)."""
        dt = x_GSD.dtype
        m = merge_GE.to(dt)
        h = torch.bmm(x_GSD, torch.einsum("ge,edf->gdf", m, self.w1_EDF.to(dt)))
        if self.b1_EF is not None:
            h = h + (m @ self.b1_EF.to(dt))[:, None, :]
        g = None if self.w3_EDF is None else torch.bmm(x_GSD, torch.einsum("ge,edf->gdf", m, self.w3_EDF.to(dt)))
        y = torch.bmm(self._hidden(h, g), torch.einsum("ge,efo->gfo", m, self.w2_EFO.to(dt)))
        if self.b2_EO is not None:
            y = y + (m @ self.b2_EO.to(dt))[:, None, :]
        return self.drop(y)

    def load_dense_mlp(self, fc1: nn.Linear, fc2: nn.Linear, fc3: nn.Linear | None = None) -> None:
        """Copy one dense FFN into every expert (sparse upcycling, Komatsuzaki et al., ICLR 2023)."""
        with torch.no_grad():
            self.w1_EDF.copy_(fc1.weight.t().expand_as(self.w1_EDF))
            self.w2_EFO.copy_(fc2.weight.t().expand_as(self.w2_EFO))
            if self.w3_EDF is not None and fc3 is not None:
                self.w3_EDF.copy_(fc3.weight.t().expand_as(self.w3_EDF))
            if self.b1_EF is not None and fc1.bias is not None:
                self.b1_EF.copy_(fc1.bias.expand_as(self.b1_EF))
            if self.b2_EO is not None and fc2.bias is not None:
                self.b2_EO.copy_(fc2.bias.expand_as(self.b2_EO))
