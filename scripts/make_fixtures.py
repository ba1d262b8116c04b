"""Build the small PEFT adapters in fixtures/ with real PEFT on tiny Llama models.

    python scripts/make_fixtures.py            # rewrites fixtures/peft-*

The factors get a decaying spectrum (like trained adapters) from a fixed seed, so
the fixtures are reproducible and the update is not the all-zero PEFT init.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny models are test scaffolding, not installed

from helpers.models import tiny_llama  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def fill_lora(model, seed: int) -> None:
    """Give every LoRA pair a non-zero update with a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    for name, mod in sorted(model.named_modules()):
        for attr in ("lora_A", "lora_B"):
            layer = getattr(mod, attr, None)
            if layer is None or "default" not in layer:
                continue
            w = layer["default"].weight
            with torch.no_grad():
                noise = torch.randn(w.shape, generator=g)
                r = w.shape[0] if attr == "lora_A" else w.shape[1]
                decay = torch.tensor([0.7 ** i for i in range(r)])
                w.copy_(noise * (decay[:, None] if attr == "lora_A" else decay[None, :]) * 0.05)


def build(dest: Path, seed: int, dtype=torch.float32, **lora_kw) -> None:
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(seed)
    cfg = LoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **lora_kw)
    peft_model = get_peft_model(model, cfg)
    fill_lora(peft_model, seed + 100)
    peft_model.to(dtype)
    if dest.exists():
        shutil.rmtree(dest)
    peft_model.save_pretrained(dest)
    print(f"wrote {dest}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "fixtures")
    args = ap.parse_args()
    build(args.out / "peft-tiny-llama", seed=0, r=8, lora_alpha=16)
    build(args.out / "peft-tiny-llama-fp16", seed=1, dtype=torch.float16, r=8, lora_alpha=16)
    build(args.out / "peft-tiny-llama-patterns", seed=2, r=8, lora_alpha=16, use_rslora=True,
          rank_pattern={"q_proj": 4, "down_proj": 12}, alpha_pattern={"layers.1.self_attn.v_proj": 5},
          modules_to_save=["lm_head"])


if __name__ == "__main__":
    main()
