"""`LowRankLinear`: a linear map stored as two factors, y = W_u (W_v x) + b.

The factors live in two plain `nn.Linear` children so that everything that already knows how to handle an
`nn.Linear` works on them unchanged: bitsandbytes 4-bit swaps (`quantize.py`), WeLore LRC training (train
`u_proj`/`v_proj`), optimizers and state dicts. This matches SVD-LLM's `u_proj`/`v_proj` naming.

Caveat: `v_proj` is also a LLaMA attention projection name, so `self_attn.q_proj.v_proj` ends in `.v_proj`.
Never target modules by bare suffix on a decomposed model; `deftlab.adapters` builds exact-name regexes.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from deftlab.errors import DeftlabError


class LowRankLinear(nn.Module):
    """y = u_proj(v_proj(x)); `v_proj` holds W_v (rank×in, no bias), `u_proj` holds W_u (out×rank, original bias)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if rank < 0 or in_features <= 0 or out_features <= 0:
            raise DeftlabError(
                f"LowRankLinear({in_features}, {out_features}, rank={rank}) has a non-positive size",
                "use in/out features > 0 and rank >= 0",
            )
        self.in_features = in_features
        self.out_features = out_features
        with warnings.catch_warnings():
            # rank 0 is legal (DeFT with θ ≤ r puts every component in the LoRA); its init is a no-op
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.v_proj = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
            self.u_proj = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def rank(self) -> int:
        return self.v_proj.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u_proj(self.v_proj(x))

    @classmethod
    def from_factors(
        cls,
        W_u: torch.Tensor,
        W_v: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        requires_grad: bool = True,
    ) -> "LowRankLinear":
        """Wrap existing factors (no copy for contiguous tensors: the module takes the tensors it is given).

        Built on the meta device first, so constructing it never allocates a dense (out×in) or a second
        factor-sized buffer; the given tensors are then assigned as the parameters.
        """
        if W_u.dim() != 2 or W_v.dim() != 2 or W_u.shape[1] != W_v.shape[0]:
            raise DeftlabError(
                f"factor shapes {tuple(W_u.shape)} and {tuple(W_v.shape)} do not chain",
                "pass W_u (out×k) and W_v (k×in)",
            )
        if W_u.dtype != W_v.dtype or W_u.device != W_v.device:
            raise DeftlabError("W_u and W_v differ in dtype or device", "cast both factors the same way")
        out_features, rank = W_u.shape
        in_features = W_v.shape[1]
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise DeftlabError(f"bias of shape {tuple(bias.shape)} does not match out={out_features}", "pass a 1-D bias")
        with torch.device("meta"):
            module = cls(in_features, out_features, rank, bias=bias is not None, dtype=W_u.dtype)
        # row-major storage: SVD factors are often column-major views, and a saved/reloaded checkpoint is
        # row-major, so normalising here keeps reloaded logits bit-identical
        module.v_proj.weight = nn.Parameter(W_v.detach().contiguous(), requires_grad=requires_grad)
        module.u_proj.weight = nn.Parameter(W_u.detach().contiguous(), requires_grad=requires_grad)
        if bias is not None:
            module.u_proj.bias = nn.Parameter(bias.detach().to(W_u.dtype), requires_grad=requires_grad)
        return module

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_u, W_v) as dense float tensors (dequantised if the children are 4-bit)."""
        return linear_weight(self.u_proj), linear_weight(self.v_proj)

    def dense_weight(self) -> torch.Tensor:
        """W_u W_v (out×in); for export and tests only — it is the matrix this module exists to avoid."""
        W_u, W_v = self.factors()
        return W_u @ W_v

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def linear_weight(linear: nn.Module) -> torch.Tensor:
    """The float weight of an `nn.Linear` or a bitsandbytes `Linear4bit` (dequantised), detached."""
    weight = linear.weight
    if type(weight).__name__ == "Params4bit" and getattr(weight, "bnb_quantized", False):
        import bitsandbytes.functional as bnbF

        return bnbF.dequantize_4bit(weight.data, weight.quant_state).detach()
    return weight.detach()
