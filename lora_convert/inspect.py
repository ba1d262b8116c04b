"""`inspect`: a description of an adapter or a LoRA-Mini file (text and JSON), without torch.

Adapters are described from their headers, configs and stored bytes (formats.scan), with every
check reading them makes; LyCORIS modules are converted as reading converts them (numpy); PEFT
pickles are read (torch.load). LoRA-Mini files are checked as loading checks them
(containerspec: checksums, regenerated outers and their fingerprints), without making tensors.
"""
from __future__ import annotations

from pathlib import Path

from . import formats, quant
from .containerspec import is_mini, open_mini, stored_bits
from .st import dtype_name

# hub.HF_SCHEME, known here without importing the Hub client for a local adapter
HF_SCHEME = "hf://"


def describe(path, fmt=None, allow_pickle=False) -> dict:
    local = Path(path)
    if isinstance(path, str) and path.startswith(HF_SCHEME):
        from .hub import local_path  # as in api.load_adapter: the Hub client loads when first needed

        local = local_path(path)
    if fmt is None and is_mini(local):
        return _describe_mini(local)
    return _describe_adapter(local, fmt, allow_pickle)


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
    f = open_mini(path)
    source_format = f.doc["source_format"]
    lines = [f"{path}: LoRA-Mini file from a {source_format} adapter, {len(f.specs)} modules"]
    rows = []
    for name in f.specs:
        spec = f.check_module(name)
        o, fid, q = spec["outer"], spec.get("fidelity") or {}, dict(spec.get("quant") or {})
        out_f, in_f, k = spec["out_features"], spec["in_features"], spec["inner_rank"]
        bits = stored_bits(o["source"], out_f, in_f, int(o["a"]), int(o["b"]), k, q, f.itemsize(name))
        rows.append({"name": name, "shape": [out_f, in_f], "rank": spec["rank"], "inner_rank": k, "outer": o,
                     "fidelity": fid, "bits": bits, "quant": q or None})
        seed = f" seed={o['seed']}" if "seed" in o else ""
        codebook = f" ({q['bits']})" if quant.is_codebook(q.get('bits')) else ""
        lines.append(f"  {name:<60} {out_f}x{in_f} r={spec['rank']} k={k} "
                     f"outer={o['source']} {o['a']}x{o['b']}{seed} bits={bits:.2f}{codebook} "
                     f"rel.err={fid.get('rel_error', float('nan')):.2e}")
    return {"path": str(path), "format": "lora-mini", "source_format": source_format, "modules": rows,
            "_text": "\n".join(lines)}
