"""Rounding trained factors to a quantized file with error feedback on the training text.

Plain rounding (round to nearest in every group) treats each factor entry alone. A recovered
module's output error on its inputs x, scale·(B'A' − B̂Â)x, is smaller when the input-side factor
Â (k×in for stored outers; Y, which reads V x, for random ones) is rounded column by column with
each column's error pushed onto the columns not yet rounded, against the second moment of what it
reads (GPTQ's update, whiten.error_feedback_round, with the format's own quantizer), and the
output-side factor is then re-fitted in float to the rounded Â before it is rounded to nearest.

The second moments come from a forward pass of the teacher over the training sequences (forward
pre-hooks on the adapted modules, recovery.calibration). The result lies on the file's grid: the
writer (and quantization-aware training, which starts from it) rounds it to itself.
"""
from __future__ import annotations

import numpy as np
import torch

from ..calibrated import feedback_rounded, input_metric
from ..whiten import feedback_factor
from . import data as D
from .calibration import InputStats, collect_input_stats
from .layers import MiniLayer, base_shape, use_mode
from .qat import storage_round


def quantized(layer: MiniLayer) -> bool:
    """Whether the file stores this layer's factors as integer or codebook codes."""
    return "bits" in layer.storage and layer.storage["bits"] != 16


def input_stats(model: torch.nn.Module, layers: dict[str, MiniLayer], seqs: list[list[int]], batch_size: int,
                pad_id: int) -> dict[str, InputStats]:
    """Second moments of the inputs of the quantized linear layers, with the teacher's update
    applied (the inputs the student should reproduce the teacher's outputs on)."""
    paths = {m.name: p for p, m in model.named_modules() if isinstance(m, MiniLayer)}
    modules = {n: (paths[n], base_shape(layer.base, layer.kind)[1])
               for n, layer in layers.items() if layer.kind == "linear" and quantized(layer)}
    if not modules:
        return {}
    with use_mode(layers.values(), "teacher"):
        return collect_input_stats(model, modules, D.eval_batches(seqs, batch_size, pad_id))


def metric(layer: MiniLayer, stats: InputStats) -> torch.Tensor:
    """Lower-triangular factor of the second moment the layer's input-side factor reads (float64)."""
    return input_metric(stats.factor(), None if layer.factored else layer.V.to("cpu", torch.float64) * layer.c_v)


@torch.no_grad()
def feedback_round(layer: MiniLayer, M: torch.Tensor, feedback: np.ndarray | None = None) -> None:
    """Set the layer's factors to values on the file's grid, rounded with error feedback against
    the metric M of its input-side factor (metric(); see the module docstring). `feedback`:
    feedback_factor(M), when the caller shares it between layers that read the same input. Raises
    ValueError for factors the file cannot hold (non-finite, or past the float16 scales)."""
    B, A = layer.inner_matrices()  # file coordinates, float64: B multiplies A's output
    spec = layer.storage
    A32 = A.float().double()  # the float32 values export encodes
    if A.shape[0] < A.shape[1]:  # wide: its vectors are its rows, as the quantizer walks them
        R = feedback_factor(M) if feedback is None else feedback
        QA = torch.from_numpy(feedback_rounded(A32.numpy(), spec["bits"], spec["group"], R)).double()
    else:
        QA = storage_round(A32, spec)
    # B re-fitted to the rounded A: min ||(B A − B' QA) M||, a k×k solve
    AM, QM = A @ M, QA @ M
    G = QM @ QM.T
    G.diagonal().add_(1e-12 * float(G.diagonal().mean()) + 1e-300)
    B = torch.linalg.solve(G, (AM @ QM.T).T @ B.T).T
    QB = storage_round(B.float().double(), spec)
    dev = layer.X.device
    layer.X.copy_((QB * layer.c_u).to(dev, torch.float32))
    layer.Y.copy_((QA * layer.c_v).to(dev, torch.float32))


def feedback_round_all(layers: dict[str, MiniLayer], stats: dict[str, InputStats], accelerator=None) -> None:
    """feedback_round for every layer with statistics, each metric and feedback factor computed once
    per input (q/k/v read one, gate/up another; random outers: once per input and outer). With
    several processes (`accelerator`), the main process's values are sent to all, so that the ranks
    start the next phase from one state whatever their floating-point differences."""
    shared = {}
    for name, s in stats.items():
        layer = layers[name]
        key = (s.source, None if layer.factored else layer.V.data_ptr())
        if key not in shared:
            M = metric(layer, s)
            shared[key] = (M, feedback_factor(M))
        feedback_round(layer, *shared[key])
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        for name in stats:
            for p in (layers[name].X, layers[name].Y):
                p.data.copy_(broadcast(p.data.clone()))
