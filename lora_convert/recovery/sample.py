"""Training text sampled from the models themselves, for recovery without (or beside) a data file.

Recovery fits the inner matrices to the teacher on whatever text it is given, and keeps most on
text like it: a narrow file teaches the student the adapter's effect on that kind of text only.
Sequences sampled from the teacher (base + original adapter) show where the adapter acts; those
sampled from the base model are broad, generic text. Half of each, at temperature 1, seeded.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Callable

import torch

from ..atomic import atomic_file
from ..errors import BadInputError
from .layers import use_mode

SOURCES = ("teacher", "base")
SAMPLES_FILE = "samples.safetensors"  # in the checkpoint directory


def cached_samples(directory: str | None, identity: dict, shape: tuple[int, int], vocab: int,
                   make: Callable[[], list[list[int]]], write: bool = True) -> list[list[int]]:
    """make()'s sequences (`shape`: how many, how long), kept in DIRECTORY/samples.safetensors
    (token ids and `identity`: what decides the samples), so that a later run with the same
    identity (a --resume after an interruption) reads them instead of sampling again: minutes on
    a CPU. A file of another identity or shape, one that cannot be read, or one with ids outside
    the vocabulary is replaced. `write`: this process writes the file (the main one of several)."""
    if directory is None:
        return make()
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save

    path = Path(directory) / SAMPLES_FILE
    key = json.dumps(identity, sort_keys=True)
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.get_slice("ids") if list(f.keys()) == ["ids"] else None
            if ((f.metadata() or {}).get("identity") == key and stored is not None
                    and stored.get_dtype() == "I32" and stored.get_shape() == list(shape)):
                ids = f.get_tensor("ids")  # its size is known now: shape × 4 bytes
                if ids.numel() and 0 <= int(ids.min()) and int(ids.max()) < vocab:
                    return ids.tolist()
    except (OSError, SafetensorError):
        pass
    seqs = make()
    if write and seqs:
        with atomic_file(path) as tmp:
            # bytes into the temporary file atomic_file made (its permissions; save_file would replace it)
            tmp.write_bytes(save({"ids": torch.tensor(seqs, dtype=torch.int32)}, metadata={"identity": key}))
    return seqs


@torch.no_grad()
def sample_sequences(model: torch.nn.Module, tokenizer, layers, n: int, length: int, seed: int = 0,
                     batch_size: int = 16) -> list[list[int]]:
    """`n` token sequences of `length` tokens (the start token and length − 1 sampled ones): the
    first ⌈n/2⌉ from the teacher, the rest from the base model (`layers`' modes), each batch from
    a generator seeded by (seed, batch), so that the text does not depend on the device's other
    random draws. `model` is a causal LM with `layers` injected (inject)."""
    if n <= 0:
        return []
    if length < 2:
        raise BadInputError(f"--max-len must be at least 2, got {length}")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise BadInputError("the tokenizer has neither a BOS nor an EOS token to start sampling from")
    device = next(model.parameters()).device
    # transformers 5 names the cache `cache`; earlier versions `past_key_values`
    cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    n_teacher = -(-n // 2)
    out: list[list[int]] = []
    for source, count in zip(SOURCES, (n_teacher, n - n_teacher)):
        with use_mode(layers, source):
            for first in range(0, count, batch_size):
                rows = min(batch_size, count - first)
                gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + len(out))
                out.extend(_sample(model, cache, start, rows, length, gen, device))
    return out


def _sample(model, name: str, start: int, rows: int, length: int, gen: torch.Generator, device) -> list[list[int]]:
    """One batch, token by token with the model's key/value cache (its keyword and attribute: `name`)."""
    ids = torch.full((rows, 1), start, dtype=torch.long, device=device)
    tokens, past = [ids], None
    for _ in range(length - 1):
        out = model(input_ids=ids, use_cache=True, **{name: past})
        past = getattr(out, name)
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
        ids = torch.multinomial(probs, 1, generator=gen)
        tokens.append(ids)
    return torch.cat(tokens, dim=1).tolist()
