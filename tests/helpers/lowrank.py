"""Low-rank LoRA factors with a chosen spectrum, and the dense reference error of a LoRA-Mini fit."""
from __future__ import annotations

import torch

D = torch.float64


def lowrank(out: int, inp: int, r: int, seed: int = 0, cond: float = 1.0,
            scale: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 factors B (out×r), A (r×in) of an update with a decaying spectrum.

    B's columns are orthonormal (when out >= r; else Gaussian) times singular values falling
    geometrically from `scale` to `scale / cond`; A's rows are Gaussian with norm about 1.
    So B's condition number is `cond` exactly, which decides the Gram/Cholesky or QR route,
    and the default scale is that of a trained adapter's factors.
    """
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(out, r, generator=g, dtype=D)
    if out >= r:
        b = torch.linalg.qr(b)[0]
    spectrum = torch.logspace(0, -torch.log10(torch.tensor(cond, dtype=D)).item(), r, dtype=D)
    A = torch.randn(r, inp, generator=g, dtype=D) / inp**0.5
    return b * spectrum * scale, A


def dense_rel_error(m, mini) -> float:
    """‖U·X·Y·V − B·A‖ / ‖B·A‖ of LoraModule `m` and its MiniModule `mini`, formed densely in
    float64 (the reference the factored error formulas must match); for an all-zero update,
    the norm of the approximation."""
    target = m.up.double() @ m.down.double()
    approx = mini.U.double() @ mini.X.double() @ mini.Y.double() @ mini.V.double()
    norm = torch.linalg.matrix_norm(target)
    return float(torch.linalg.matrix_norm(approx - target) / norm) if norm else float(torch.linalg.matrix_norm(approx))
