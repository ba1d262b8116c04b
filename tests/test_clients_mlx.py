"""mlx-lm itself loads our MLX output onto a tiny Llama saved with save_pretrained; its logits
must equal PEFT's with the PEFT output of the same reconstruction."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lora_convert as lc
from tests.helpers.clients import peft_logits, rope_theta, tiny_llama_lora

mx = pytest.importorskip("mlx.core", reason="mlx (mlx[cpu]) does not install on this platform")
mlx_utils = pytest.importorskip("mlx_lm.utils", reason="mlx-lm does not install on this platform")
from mlx_lm.tuner.utils import load_adapters  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 33, 2, 77, 100, 4]])


def _mlx_logits(base, adapter=None) -> torch.Tensor:
    # mlx-lm's llama loader ignores transformers 5's rope_parameters: pass rope_theta explicitly
    model, _ = mlx_utils.load_model(base, model_config={"rope_theta": rope_theta(base)})
    if adapter is not None:
        load_adapters(model, str(adapter))
    return torch.from_numpy(np.array(model(mx.array(IDS.numpy())).astype(mx.float32))).double()


@pytest.mark.parametrize("outer, trim", [("random", False), ("random", True), ("svd", True)])
def test_mlx_lm_matches_peft(tmp_path, outer, trim):
    base, lora = tiny_llama_lora(tmp_path, use_rslora=True, alpha_pattern={"v_proj": 5})
    opts = {"outer_dim": 32, "seed": 1} if outer == "random" else {}
    lc.save(lc.compress(lc.load_adapter(lora), outer=outer, keep_energy=0.9, dtype="fp32", **opts), tmp_path / "mini")
    restored = lc.reconstruct(lc.load(tmp_path / "mini"), trim_rank=trim)
    lc.save_adapter(restored, tmp_path / "mlx", "mlx")
    lc.save_adapter(restored, tmp_path / "peft", "peft")
    want, before = peft_logits(base, tmp_path / "peft", IDS), peft_logits(base, None, IDS)
    assert (_mlx_logits(base) - before).abs().max() < 1e-4  # same base model in both clients
    effect = (want - before).abs().max()
    assert effect > 0.1
    assert (_mlx_logits(base, tmp_path / "mlx") - want).abs().max() < 1e-4 * effect
