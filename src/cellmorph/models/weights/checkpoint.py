"""Weight files: their digest, and reading them without executing pickled code.

State dicts are read with ``torch.load(..., map_location="cpu", weights_only=True)`` or from
``.safetensors``; a pickle that carries code is refused with one line naming what it wanted to run.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from cellmorph.errors import CellmorphError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def require_weights_file(path: Path, context: str = "") -> Path:
    """``path`` if it is a file; a folder or a missing path is one CellmorphError line."""
    from cellmorph.runinfo import require_file

    return require_file(path, f"a weights file{context}")


def _refused_pickle(path: Path, exc: pickle.UnpicklingError) -> str:
    """torch's multi-paragraph refusal, summarised as one line naming what the pickle wanted to run."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        what = f"pickled code (GLOBAL {found.group(1)})"
    else:
        found = re.search(r"Unsupported operand (\d+)", text)
        what = f"pickled objects the safe loader cannot check (pickle opcode {found.group(1)})" if found else "pickled objects"
    return (
        f"{path}: refused: the file holds {what}, not plain tensors; only weights_only loads are allowed "
        f"(re-save it with torch.save(model.state_dict(), FILE))"
    )


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict (or checkpoint dict) safely: never executes pickled code."""
    path = require_weights_file(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CellmorphError(
                f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)"
            ) from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise CellmorphError(f"{path}: not a readable safetensors file ({_one_line(exc)})") from None
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols before refusing a file; the error line says what matters.
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CellmorphError(_refused_pickle(path, exc)) from None
    except Exception as exc:
        raise CellmorphError(f"{path}: not a readable PyTorch weights file ({_one_line(exc)[:200]})") from None
    return obj


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def extract_state_dict(obj, origin: str = "checkpoint") -> "OrderedDict[str, torch.Tensor]":
    """The tensor dict inside a plain state dict or a training checkpoint (``model``/``state_dict``...)."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model_state", "model", "state_dict_ema", "net"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CellmorphError(f"{origin}: no state dict (a mapping of names to tensors) found")
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out
