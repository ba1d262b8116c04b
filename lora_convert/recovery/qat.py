"""Storage rounding of trained factors, in torch: what a LoRA-Mini file will hold.

`storage_round` gives, for a factor matrix in the file's coordinates, the values a reader decodes
after the file is written: quant.py's grouped integer rounding for quantized modules (the same
vectors, groups, fp16 scales and round-half-to-even codes, or nearest codebook levels with ties
to the lower one, bit for bit), a cast for float16 /
bfloat16 storage, nothing for float32. `fake_quant` is the straight-through estimator for
quantization-aware training: its forward value is the rounded matrix, its gradient passes to the
unrounded one unchanged.

The group scales come from quant.scales_for, in numpy: the writer's own choice (clipped scales at
2-4 bits included), and torch converts float64 to float16 through float32, a double rounding that
can differ from the specification's single one. They are a few numbers per group, and need no
gradient.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import quant

FLOAT_STORAGE = {torch.float16, torch.bfloat16, torch.float32}


def grid_round(M: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """quant.rounded(M, bits, group) in torch (float64, on M's device): the matrix a reader decodes
    from quant.encode(M, bits, group). M is read as float64."""
    quant.check_bits(bits)
    quant.check_group(group)
    M = M.detach().to(torch.float64)
    if bits == 16:
        # exact: M holds float32 values (the file's factors are float32 before they are encoded),
        # and float32 -> float16 is one correctly rounded step
        return M.to(torch.float32).to(torch.float16).to(torch.float64)
    tall = M.shape[0] >= M.shape[1]
    T = M.T if tall else M  # vectors along the long side, as quant.py cuts them
    S, L = T.shape
    if T.numel() == 0:
        return M.clone()
    ng = -(-L // group)
    G = F.pad(T, (0, ng * group - L)).reshape(S, ng, group)
    top = quant.top_level(bits)
    maxabs = G.abs().amax(dim=2).cpu().numpy()
    # groups a file cannot hold (non-finite values, scales past float16) come out as NaN: a
    # diverged state is then judged unusable, not refused halfway through a run
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(maxabs) | (maxabs / top > quant.FP16_MAX)
    groups = G.detach().cpu().numpy()
    if bad.any():
        groups = np.where(bad[:, :, None], 0.0, groups)
    scales = torch.from_numpy(quant.scales_for(groups, bits, np.where(bad, 0.0, maxabs)).astype(np.float64))
    scales = scales.to(M.device)[:, :, None]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    t = torch.where(scales > 0, G / safe, torch.zeros_like(G))
    if quant.is_codebook(bits):
        # level index = how many decision midpoints lie below t (a tie goes to the lower level);
        # c·s is rounded once, to float32, as quant.codebook_values does
        levels = torch.from_numpy(quant.codebook_levels(bits)).to(M.device)
        codes = torch.zeros(t.shape, dtype=torch.long, device=M.device)
        for mid in quant.codebook_midpoints(bits).tolist():
            codes += t > mid
        q = (levels[codes] * scales).to(torch.float32).to(torch.float64)
    else:
        q = torch.round(t).clamp_(-top, top) * scales
    if bad.any():
        q = torch.where(torch.from_numpy(bad).to(M.device)[:, :, None], torch.full_like(q, float("nan")), q)
    vals = q.reshape(S, ng * group)[:, :L]
    return vals.T.contiguous() if tall else vals.contiguous()


def storage_round(M: torch.Tensor, storage: dict) -> torch.Tensor:
    """The values a file stores for factor M (file coordinates): `storage` is a module's quant spec
    ({"bits", "group"}) or {"dtype": torch dtype} for float tensors. float64, no gradient."""
    if "bits" in storage:
        return grid_round(M, storage["bits"], storage["group"])
    M = M.detach().to(torch.float64)
    dtype = storage["dtype"]
    if dtype == torch.float32:
        return M.to(torch.float32).to(torch.float64)
    return M.to(torch.float32).to(dtype).to(torch.float64)


def lossless(storage: dict) -> bool:
    """Whether storing float32 factors this way changes nothing (plain float32 tensors)."""
    return "bits" not in storage and storage["dtype"] == torch.float32


def fake_quant(P: torch.Tensor, to_file: float, storage: dict) -> torch.Tensor:
    """Straight-through estimator for a trained parameter P whose file value is P / to_file rounded
    to float32 (what export writes before encoding): the forward sees the stored value (back in
    P's coordinates), the backward passes the gradient to P as if nothing were rounded."""
    file = (P.detach().to(torch.float64) / to_file).to(torch.float32)
    stored = (storage_round(file, storage) * to_file).to(P.dtype)
    return P + (stored - P).detach()
