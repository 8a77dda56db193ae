"""The arithmetic of an intervention: pure torch edits of activations (issue 9; DESIGN.md
"Intervention"). Shapes: B batch, T positions, D width, K directions.

    ablate(x_BTD, Q_DK, c_D) = (x - c) - ((x - c) Q) Q^T + c       Q: orthonormal columns (QR)
    steer(x_BTD, d_D, alpha, scale) = x + alpha * scale * d         d: unit direction

The hook that applies them to a model's block lives in ep_store.studies.intervene. Bad
arguments (widths that differ, a basis that is not a K x D matrix) raise ValueError.
"""

from __future__ import annotations

import torch


def _check_width(x: torch.Tensor, name: str, width: int) -> None:
    if x.shape[-1] != width:
        raise ValueError(f"{name} has width {width} but the activations have width {x.shape[-1]}")


def ablate(x_BTD: torch.Tensor, Q_DK: torch.Tensor, c_D: torch.Tensor) -> torch.Tensor:
    """Remove the span of ``Q``'s orthonormal columns from ``x - c``: (x-c) - ((x-c)Q)Q^T + c.

    Works for any leading shape (``x_...D``); computes in ``x``'s dtype. The component of
    ``x`` along ``Q`` becomes the center's component; the orthogonal part is unchanged.
    """
    if Q_DK.dim() != 2 or c_D.dim() != 1:
        raise ValueError(f"ablate takes Q_DK (2-D) and c_D (1-D), got {Q_DK.dim()}-D and {c_D.dim()}-D")
    _check_width(x_BTD, "Q_DK", Q_DK.shape[0])
    _check_width(x_BTD, "c_D", c_D.shape[0])
    centered = x_BTD - c_D
    return centered - (centered @ Q_DK) @ Q_DK.T + c_D


def steer(x_BTD: torch.Tensor, d_D: torch.Tensor, alpha: float, scale: float) -> torch.Tensor:
    """Add ``alpha * scale * d``: ``alpha`` in units of the layer's typical ``|a - c|`` (``scale``)."""
    if d_D.dim() != 1:
        raise ValueError(f"steer takes a direction d_D (1-D), got {d_D.dim()}-D")
    _check_width(x_BTD, "d_D", d_D.shape[0])
    return x_BTD + (alpha * scale) * d_D


def orthonormal_basis(V_KD: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Q_DK' with orthonormal columns spanning the rows of ``V`` (reduced QR in float64).

    Directions that lie in the span of earlier ones are dropped (K' <= K).
    """
    if V_KD.dim() != 2:
        raise ValueError(f"orthonormal_basis takes V_KD (2-D: K directions by D), got {V_KD.dim()}-D")
    if V_KD.shape[0] == 0:
        return torch.zeros(V_KD.shape[1], 0, dtype=torch.float32)
    Q, R = torch.linalg.qr(V_KD.to(torch.float64).T)
    keep = R.diagonal().abs() > tol * R.diagonal().abs().max().clamp_min(1e-300)
    return Q[:, keep].to(torch.float32)
