"""Dense linear-algebra helpers shared by the decomposition, LoftQ and the delta codecs."""

from __future__ import annotations

import torch
from torch import Tensor


def thin_svd(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torch.linalg.svd(M, full_matrices=False), run on the orientation LAPACK handles faster.

    torch hands LAPACK a column-major copy; for a wide row-major M (out < in) gesdd then takes its LQ path over
    strided rows. Mᵀ is a column-major tall matrix as it lies in memory, so its SVD needs no copy and takes
    the QR path: 576×1536 in 86 ms instead of 127 ms, 192×576 in 7.6 instead of 9.1 here (same σ to 1e-13).
    M = (Mᵀ)ᵀ = (U' Σ V'ᵀ)ᵀ gives U = V', Vᵀ = U'ᵀ (returned as transposed views).
    """
    if M.shape[0] < M.shape[1]:
        U_t, s, Vh_t = torch.linalg.svd(M.T, full_matrices=False)
        return Vh_t.T, s, U_t.T
    return torch.linalg.svd(M, full_matrices=False)
