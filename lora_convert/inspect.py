"""`inspect`: a description of an adapter or a LoRA-Mini file (text and JSON).

Adapters are described from their headers, configs and stored bytes (formats.scan), with every
check reading them makes, without importing torch; LyCORIS files (converted by an SVD) and PEFT
pickles are read. LoRA-Mini files are opened with the container (torch).
"""
from __future__ import annotations

from pathlib import Path

from . import formats
from .errors import BadInputError
from .st import dtype_name, read_header

# container.FILE_NAME and FORMAT_NAME, hub.HF_SCHEME: known here without importing those (torch,
# the Hub client) for a local adapter
MINI_FILE_NAME = "lora_mini.safetensors"
MINI_FORMAT_NAME = "lora-mini"
HF_SCHEME = "hf://"


def describe(path, fmt=None, allow_pickle=False) -> dict:
    local = Path(path)
    if isinstance(path, str) and path.startswith(HF_SCHEME):
        from .hub import local_path  # as in api.load_adapter: the Hub client loads when first needed

        local = local_path(path)
    if fmt is None and is_mini(local):
        return _describe_mini(local)
    return _describe_adapter(local, fmt, allow_pickle)


def is_mini(path) -> bool:
    """container.is_mini from the header alone (the container imports torch)."""
    path = Path(path)
    file = path / MINI_FILE_NAME if path.is_dir() else path
    if not file.is_file():
        return False
    if file.name == MINI_FILE_NAME:
        return True
    try:
        return read_header(file).metadata.get("format") == MINI_FORMAT_NAME
    except BadInputError:
        return False


def _describe_adapter(path, fmt, allow_pickle) -> dict:
    adapter = formats.scan(path, fmt, allow_pickle=allow_pickle)
    if adapter is None:  # this layout (or file) needs tensors to be described
        adapter = formats.read(path, fmt, allow_pickle=allow_pickle)
    label = formats.label(adapter)
    rows = []
    for m in adapter.modules if isinstance(adapter, formats.AdapterHeader) else adapter.modules():
        row = {"name": m.name, "kind": m.kind, "shape": [m.out_features, m.in_features], "rank": m.rank,
               "alpha": m.alpha, "scale": m.scale, "dtype": dtype_name(m.dtype)}
        if getattr(m, "conversion_error", None) is not None:  # LyCORIS -> LoRA by factored SVD
            row["conversion_error"] = m.conversion_error
        rows.append(row)
    params = sum(r["rank"] * sum(r["shape"]) for r in rows)
    doc = {"path": str(path), "format": adapter.format, "label": label, "modules": rows,
           "passthrough": adapter.passthrough_names, "lora_parameters": params}
    lines = [f"{path}: {label} adapter, {len(rows)} LoRA modules, {params:,} LoRA parameters"]
    lines += [f"  {r['name']:<60} {r['kind']:<9} {r['shape'][0]}x{r['shape'][1]}  r={r['rank']} "
              f"alpha={r['alpha']:g} scale={r['scale']:g} {r['dtype']}"
              + (f" conversion rel.err={r['conversion_error']:.2e}" if "conversion_error" in r else "")
              for r in rows]
    if adapter.passthrough_names:
        lines.append(f"  passthrough tensors (modules_to_save, saved base layers): {len(adapter.passthrough_names)}")
    doc["_text"] = "\n".join(lines)
    return doc


def _describe_mini(path) -> dict:
    from . import container

    mini = container.load(path)
    specs = mini.module_names
    lines = [f"{path}: LoRA-Mini file from a {mini.source_format} adapter, {len(specs)} modules"]
    rows = []
    for m in mini.modules():
        o = m.outer
        rows.append({"name": m.name, "shape": [m.out_features, m.in_features], "rank": m.rank,
                     "inner_rank": m.inner_rank, "outer": o, "fidelity": m.fidelity, "bits": m.bits,
                     "quant": m.quant or None})
        seed = f" seed={o['seed']}" if "seed" in o else ""
        codebook = f" ({m.codebook})" if m.codebook else ""
        lines.append(f"  {m.name:<60} {m.out_features}x{m.in_features} r={m.rank} k={m.inner_rank} "
                     f"outer={o['source']} {o['a']}x{o['b']}{seed} bits={m.bits:.2f}{codebook} "
                     f"rel.err={m.fidelity.get('rel_error', float('nan')):.2e}")
    return {"path": str(path), "format": "lora-mini", "source_format": mini.source_format, "modules": rows,
            "_text": "\n".join(lines)}
