"""Expert forms beyond ``core.experts.Experts``: LoRA experts over a frozen base FFN, and the sizing
rule of fine-grained experts.

LoRA experts (MoLoRA, Zadouri et al., "Pushing Mixture of Experts to the Limit", ICLR 2024;
MixLoRA, Li et al., arXiv 2404.15159): expert e is the shared, frozen base FFN with its own low-rank
deltas on every projection, ``W_e = W + (α/r)·A_e B_e`` (A_e: in×r, B_e: r×out, B zero-initialised so
a fresh layer equals the base FFN). The base projection of a token is computed once; only the
rank-r paths are per expert. Route with a renormalised top-k router (``conf/router/mixtral.yaml``).

Fine-grained experts (DeepSeekMoE, Dai et al. 2024): split each of E experts of width F into m
experts of width F/m and activate m·K of them (keeping parameters and activated FLOPs);
``fine_grained_experts`` returns the layer settings.

Legend: N rows (sorted assignments), D input width, F hidden width, O output width, E experts,
R LoRA rank, M rows per expert (batched path), G groups, S tokens per group.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.experts import Experts, _ContiguousGrad, _grouped_mm
from core.routers.base import check_positive_int


def fine_grained_experts(num_experts: int, hidden_features: int, granularity: int, top_k: int,
                         num_shared_experts: int = 0) -> dict[str, int]:
    """DeepSeekMoE segmentation of E experts of width F, K active, into m·E experts of width F/m.

    ``num_shared_experts`` (K_s) of the fine-grained experts are isolated as always-on shared ones,
    so ``m·E − K_s`` are routed and ``m·K − K_s`` of those are active. Returns the MoE layer's
    ``num_experts``, ``hidden_features``, ``num_shared_experts`` and the router's ``top_k``.
    """
    E = check_positive_int("num_experts", num_experts)
    F = check_positive_int("hidden_features", hidden_features)
    m = check_positive_int("granularity", granularity)
    K = check_positive_int("top_k", top_k)
    Ks = check_positive_int("num_shared_experts", num_shared_experts, minimum=0)
    if F % m:
        raise ValueError(f"granularity={m} is not allowed: it must divide hidden_features={F}.")
    if Ks >= m * K:
        raise ValueError(f"num_shared_experts={Ks} is not allowed: it must be < granularity·top_k={m * K}.")
    return {"num_experts": m * E - Ks, "hidden_features": F // m, "top_k": m * K - Ks,
            "num_shared_experts": Ks}



def _lora_pair(E: int, fan_in: int, rank: int, fan_out: int, dd: dict) -> tuple[nn.Parameter, nn.Parameter]:
    bound = 1.0 / math.sqrt(fan_in)
    a = nn.Parameter(torch.empty(E, fan_in, rank, **dd).uniform_(-bound, bound))
    b = nn.Parameter(torch.zeros(E, rank, fan_out, **dd))
    return a, b


class LoRAExperts(nn.Module):
    """E LoRA experts sharing one frozen base FFN; the interface of ``core.experts.Experts``.

    Args:
        num_experts: E.
        in_features: D.
        hidden_features: F, the base FFN's hidden width.
        out_features: O (default D).
        act_layer, glu, bias, drop, norm_layer, impl: as ``Experts`` (they shape the base FFN).
        rank: r, the rank of each expert's deltas.
        alpha: LoRA scaling numerator; deltas are scaled by α/r.
        freeze_base: keep the base FFN's parameters out of training (MoLoRA/MixLoRA: frozen).
    """

    def __init__(self, num_experts: int, in_features: int, hidden_features: int, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, glu: bool = False, bias: bool = True, drop: float = 0.0,
                 norm_layer: type[nn.Module] | None = None, impl: str = "auto", device=None, dtype=None, *,
                 rank: int = 8, alpha: float = 16.0, freeze_base: bool = True):
        super().__init__()
        E = check_positive_int("num_experts", num_experts)
        R = check_positive_int("rank", rank)
        self.base = Experts(1, in_features, hidden_features, out_features, act_layer=act_layer, glu=glu,
                            bias=bias, drop=drop, norm_layer=norm_layer, impl=impl, device=device, dtype=dtype)
        if freeze_base:
            self.base.requires_grad_(False)
        D, F, O = self.base.in_features, self.base.hidden_features, self.base.out_features
        self.num_experts, self.in_features, self.hidden_features, self.out_features = E, D, F, O
        self.glu, self.impl, self.rank, self.scaling = glu, impl, R, alpha / R
        dd = {"device": device, "dtype": dtype}
        self.a1_EDR, self.b1_ERF = _lora_pair(E, D, R, F, dd)
        self.a2_EFR, self.b2_ERO = _lora_pair(E, F, R, O, dd)
        if glu:
            self.a3_EDR, self.b3_ERF = _lora_pair(E, D, R, F, dd)
        else:
            self.a3_EDR = self.b3_ERF = None

    # -- per-expert weights (reference and merging) ---------------------------------------------
    def expert_weights(self, e: int) -> dict[str, torch.Tensor]:
        """Expert e's full projections ``W + (α/r)·A_e B_e`` (w1: D×F, w2: F×O, w3: D×F or None)."""
        b = self.base
        out = {"w1": b.w1_EDF[0] + self.scaling * self.a1_EDR[e] @ self.b1_ERF[e],
               "w2": b.w2_EFO[0] + self.scaling * self.a2_EFR[e] @ self.b2_ERO[e], "w3": None}
        if self.glu:
            out["w3"] = b.w3_EDF[0] + self.scaling * self.a3_EDR[e] @ self.b3_ERF[e]
        return out

    def _delta(self, x_NI: torch.Tensor, a_EIR: torch.Tensor, b_ERO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """``(α/r)·(x A_e) B_e`` for rows sorted by expert: grouped matmuls when shapes allow, else a loop."""
        dt = x_NI.dtype
        step = 16 // x_NI.element_size()
        grouped = _grouped_mm is not None and self.impl != "loop" and all(
            w % step == 0 for w in (a_EIR.shape[1], self.rank, b_ERO.shape[2]))
        if grouped and x_NI.shape[0]:
            offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
            u_NR = _ContiguousGrad.apply(_grouped_mm(x_NI.contiguous(), a_EIR.to(dt), offs=offs_E))
            return self.scaling * _ContiguousGrad.apply(_grouped_mm(u_NR.contiguous(), b_ERO.to(dt), offs=offs_E))
        outs, start = [], 0
        for e, n in enumerate(counts_E.tolist()):
            outs.append((x_NI[start:start + n] @ a_EIR[e].to(dt)) @ b_ERO[e].to(dt))
            start += n
        if not outs:
            return x_NI.new_zeros(0, b_ERO.shape[2])
        return self.scaling * torch.cat(outs, 0)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, expert_idx_N: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of ``x_ND`` sorted by expert, ``counts_E`` rows each. Returns N×O."""
        b, dt = self.base, x_ND.dtype
        h_NF = x_ND @ b.w1_EDF[0].to(dt) + self._delta(x_ND, self.a1_EDR, self.b1_ERF, counts_E)
        if b.b1_EF is not None:
            h_NF = h_NF + b.b1_EF[0].to(dt)
        g_NF = None
        if self.glu:
            g_NF = x_ND @ b.w3_EDF[0].to(dt) + self._delta(x_ND, self.a3_EDR, self.b3_ERF, counts_E)
        z_NF = b._hidden(h_NF, g_NF)
        y_NO = z_NF @ b.w2_EFO[0].to(dt) + self._delta(z_NF, self.a2_EFR, self.b2_ERO, counts_E)
        if b.b2_EO is not None:
            y_NO = y_NO + b.b2_EO[0].to(dt)
        return b.drop(y_NO)

    # Reference path: one expert (base + its deltas) at a time, as for stacked experts.
    forward_loop = Experts.forward_loop

    def forward_expert(self, e: int, x_MD: torch.Tensor) -> torch.Tensor:
        """Expert e alone on M rows."""
        b, dt, w = self.base, x_MD.dtype, self.expert_weights(e)
        h = x_MD @ w["w1"].to(dt)
        if b.b1_EF is not None:
            h = h + b.b1_EF[0].to(dt)
        g = None if w["w3"] is None else x_MD @ w["w3"].to(dt)
        y = b._hidden(h, g) @ w["w2"].to(dt)
        if b.b2_EO is not None:
            y = y + b.b2_EO[0].to(dt)
        return b.drop(y)

    def forward_batched(self, x_EMD: torch.Tensor) -> torch.Tensor:
        """Every expert on its own M rows (Soft MoE slots, capacity buffers)."""
        b, dt, s = self.base, x_EMD.dtype, self.scaling
        h = x_EMD @ b.w1_EDF[0].to(dt) + s * torch.bmm(torch.bmm(x_EMD, self.a1_EDR.to(dt)), self.b1_ERF.to(dt))
        if b.b1_EF is not None:
            h = h + b.b1_EF[0].to(dt)
        g = None
        if self.glu:
            g = x_EMD @ b.w3_EDF[0].to(dt) + s * torch.bmm(torch.bmm(x_EMD, self.a3_EDR.to(dt)), self.b3_ERF.to(dt))
        z = b._hidden(h, g)
        y = z @ b.w2_EFO[0].to(dt) + s * torch.bmm(torch.bmm(z, self.a2_EFR.to(dt)), self.b2_ERO.to(dt))
        if b.b2_EO is not None:
            y = y + b.b2_EO[0].to(dt)
        return b.drop(y)

    def _merged(self, m_GE: torch.Tensor, w_IO: torch.Tensor, a_EIR: torch.Tensor, b_ERO: torch.Tensor) -> torch.Tensor:
        """``Σ_e m_e (W + (α/r) A_e B_e) = (Σ_e m_e) W + (α/r) Σ_e m_e A_e B_e``: G×I×O."""
        dt = m_GE.dtype
        delta = torch.einsum("ge,eir,ero->gio", m_GE, a_EIR.to(dt), b_ERO.to(dt))
        return m_GE.sum(-1)[:, None, None] * w_IO.to(dt) + self.scaling * delta

    def forward_merged(self, x_GSD: torch.Tensor, merge_GE: torch.Tensor) -> torch.Tensor:
        """One FFN per group whose parameters are ``Σ_e merge[g,e]·θ_e`` (SMEAR, Lory)."""
        b, dt = self.base, x_GSD.dtype
        m = merge_GE.to(dt)
        h = torch.bmm(x_GSD, self._merged(m, b.w1_EDF[0], self.a1_EDR, self.b1_ERF))
        if b.b1_EF is not None:
            h = h + (m.sum(-1)[:, None] * b.b1_EF[0].to(dt))[:, None, :]
        g = None
        if self.glu:
            g = torch.bmm(x_GSD, self._merged(m, b.w3_EDF[0], self.a3_EDR, self.b3_ERF))
        y = torch.bmm(b._hidden(h, g), self._merged(m, b.w2_EFO[0], self.a2_EFR, self.b2_ERO))
        if b.b2_EO is not None:
            y = y + (m.sum(-1)[:, None] * b.b2_EO[0].to(dt))[:, None, :]
        return b.drop(y)

    def load_dense_mlp(self, fc1: nn.Linear, fc2: nn.Linear, fc3: nn.Linear | None = None) -> None:
        """Copy a dense FFN into the base (the frozen pretrained FFN that every expert adapts)."""
        self.base.load_dense_mlp(fc1, fc2, fc3)
