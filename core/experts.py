"""Stacked FFN experts: all E experts' weights in single tensors, run on tokens already sorted by
expert with one grouped matmul per projection (``torch.nn.functional.grouped_mm``), as in
torchtitan's ``GroupedExperts``; a per-expert loop (Mixtral's eager path) is kept as the reference.

Forms: MLP (``act(x W1 + b1) W2 + b2``, GELU/ReLU...) and GLU (``(act(x W1) ⊙ x W3) W2``, SwiGLU with
SiLU; Shazeer, "GLU Variants Improve Transformer", 2020).

Legend: N rows (sorted assignments), D input width, F hidden width, O output width, E experts,
M rows per expert (batched path).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.routers.base import check_positive_int

_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init, per expert
    return nn.init.uniform_(t, -bound, bound)


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
        impl: ``"grouped"`` (grouped matmul), ``"loop"`` (reference) or ``"auto"`` (grouped when the
            shapes meet its 16-byte stride rule, else loop).
    """

    def __init__(self, num_experts: int, in_features: int, hidden_features: int, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, glu: bool = False, bias: bool = True, drop: float = 0.0,
                 norm_layer: type[nn.Module] | None = None, impl: str = "auto", device=None, dtype=None):
        super().__init__()
        E = check_positive_int("num_experts", num_experts)
        D = check_positive_int("in_features", in_features)
        F = check_positive_int("hidden_features", hidden_features)
        O = check_positive_int("out_features", out_features or in_features)
        if impl not in ("auto", "grouped", "loop"):
            raise ValueError(f"impl={impl!r} is not allowed: use 'auto', 'grouped' or 'loop'.")
        self.num_experts, self.in_features, self.hidden_features, self.out_features = E, D, F, O
        self.glu, self.impl = glu, impl
        dd = {"device": device, "dtype": dtype}
        self.w1_EDF = nn.Parameter(_uniform_(torch.empty(E, D, F, **dd), D))
        self.w2_EFO = nn.Parameter(_uniform_(torch.empty(E, F, O, **dd), F))
        self.w3_EDF = nn.Parameter(_uniform_(torch.empty(E, D, F, **dd), D)) if glu else None
        self.b1_EF = nn.Parameter(_uniform_(torch.empty(E, F, **dd), D)) if bias else None
        self.b2_EO = nn.Parameter(_uniform_(torch.empty(E, O, **dd), F)) if bias else None
        self.act = act_layer()
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.norm = norm_layer(F) if norm_layer is not None else nn.Identity()

    def _hidden(self, h_NF: torch.Tensor, g_NF: torch.Tensor | None) -> torch.Tensor:
        h_NF = self.act(h_NF) if g_NF is None else self.act(h_NF) * g_NF
        return self.norm(self.drop(h_NF))

    def grouped_ok(self, x_ND: torch.Tensor) -> bool:
        """grouped_mm needs 16-byte aligned strides: widths that are multiples of 16/itemsize."""
        if _grouped_mm is None:
            return False
        step = 16 // x_ND.element_size()
        return all(w % step == 0 for w in (self.in_features, self.hidden_features, self.out_features))

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, expert_idx_N: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of ``x_ND`` sorted by expert, ``counts_E`` rows each; ``expert_idx_N`` (the sorted
        expert ids) is needed only with biases. Returns N×O."""
        use_grouped = self.impl == "grouped" or (self.impl == "auto" and self.grouped_ok(x_ND))
        if not use_grouped or x_ND.shape[0] == 0:
            return self.forward_loop(x_ND, counts_E)
        x_ND = x_ND.contiguous()
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        w1, w2, w3 = self.w1_EDF.to(x_ND.dtype), self.w2_EFO.to(x_ND.dtype), self.w3_EDF
        h_NF = _grouped_mm(x_ND, w1, offs=offs_E)
        if self.b1_EF is not None:
            h_NF = h_NF + self.b1_EF.to(x_ND.dtype).index_select(0, expert_idx_N)
        g_NF = None if w3 is None else _grouped_mm(x_ND, w3.to(x_ND.dtype), offs=offs_E)
        y_NO = _grouped_mm(self._hidden(h_NF, g_NF).contiguous(), w2, offs=offs_E)
        if self.b2_EO is not None:
            y_NO = y_NO + self.b2_EO.to(x_ND.dtype).index_select(0, expert_idx_N)
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
