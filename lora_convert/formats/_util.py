"""Helpers shared by the format modules: cached key listing, error text, scale folding."""
from __future__ import annotations

import functools
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BadInputError
from ..st import read_header

if TYPE_CHECKING:  # the helpers that make tensors import it: layouts are detected and inspected without it
    import torch


@functools.lru_cache(maxsize=32)
def _cached_keys(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    return tuple(read_header(path).tensors)


def safetensors_keys(path: Path) -> tuple[str, ...]:
    """Tensor names of a safetensors file (validated header; cached so several detect() calls
    on one file read it once). An invalid header raises BadInputError naming the file."""
    st = os.stat(path)
    return _cached_keys(str(path), st.st_mtime_ns, st.st_size)


def is_safetensors_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors"


def unknown_keys_error(keys: list[str], what: str, path) -> BadInputError:
    shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    return BadInputError(f"unknown keys, not {what}: {shown}", path)


def read_json_config(directory: Path, name: str) -> tuple[dict, Path]:
    """A format's JSON config file as a dict, or one BadInputError naming the file."""
    cfg_path = directory / name
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"missing {name}", directory) from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadInputError(f"invalid JSON ({type(exc).__name__}: {exc})", cfg_path) from None
    except OSError as exc:
        raise BadInputError(f"cannot read file ({exc.strerror})", cfg_path) from None
    if not isinstance(cfg, dict):
        raise BadInputError("config is not a JSON object", cfg_path)
    return cfg, cfg_path


def most_common(values):
    return Counter(values).most_common(1)[0][0]


def int_if_whole(x):
    return int(x) if float(x).is_integer() else float(x)


def fold_scale(up: torch.Tensor, down: torch.Tensor, factor: float):
    """(up', down') with up' @ down' = factor · up @ down, the factor split as √|factor| on each
    side (sign on up) so neither factor's magnitude drifts far from the original."""
    if factor == 1.0:
        return up, down
    root = math.sqrt(abs(factor))
    sign = -1.0 if factor < 0 else 1.0
    up2 = (up.double() * (sign * root)).to(up.dtype)
    down2 = (down.double() * root).to(down.dtype)
    return up2, down2


def scalar_tensor(value: float) -> torch.Tensor:
    """A 0-d alpha tensor: float32 when that holds `value` exactly, else float64 (scale stays exact)."""
    import torch

    t = torch.tensor(value, dtype=torch.float32)
    return t if float(t) == value else torch.tensor(value, dtype=torch.float64)


def check_no_passthrough(adapter, fmt: str) -> None:
    if adapter.passthrough_names:
        from ..errors import UnsupportedError

        raise UnsupportedError(f"the adapter carries {len(adapter.passthrough_names)} full tensors "
                               f"(modules_to_save or saved base layers, e.g. {adapter.passthrough_names[0]!r}) "
                               f"that the {fmt} layout cannot hold; write it as peft instead")


def check_kernel_known(adapter, m) -> None:
    """Refuse a module whose layer kind its source could not tell (a LyCORIS LoHa/LoKr without a
    Tucker core keeps conv kernels flattened): written as a linear factor pair it would fail to
    load, or worse, in clients that expect a conv's 4-D kernel."""
    if m.name in (adapter.config.get("kernel_unknown") or ()):
        from ..errors import UnsupportedError

        raise UnsupportedError(
            f"module {m.name!r}: its LyCORIS source (LoHa/LoKr without a Tucker core) keeps a conv kernel "
            "flattened and the layer is not in the known SD1.x/SD2.x/SDXL UNet tables (for attention "
            "proj_in/proj_out: the file does not say SD1.x or SD2.x), so its kernel shape is unknown; read the "
            f"source with lora_convert.formats.read(path, conv_kernels={{{m.name!r}: (3, 3)}}) giving its "
            "kernel, or () for a linear layer (kohya files: ss_base_model_version in the metadata tells SD1.x/SD2.x)")
