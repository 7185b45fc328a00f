"""The user's weights cache: ``$CELLMORPH_HOME/weights/<model>/`` and its ``manifest.json``.

:func:`import_weights` (``cellmorph weights import``) checks a file fits the model, ImageNet head
included, copies it in under a digest-bearing name and records its sha256 in the manifest, which
resolution checks on every later read.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path

from cellmorph.errors import CellmorphError
from cellmorph.models.weights.checkpoint import (
    _one_line,
    extract_state_dict,
    load_state_dict_file,
    require_weights_file,
    sha256_file,
)
from cellmorph.models.weights.mapping import _check_imagenet_head, _load_mapped, detect_layout, to_timm_state_dict
from cellmorph.models.weights.registry import IMAGENET_CLASSES, _allowed_layouts, check_model_name
from cellmorph.runinfo import atomic_path, require_output_dir

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
MANIFEST = "manifest.json"


def cellmorph_home() -> Path:
    """``$CELLMORPH_HOME`` if set, else the platform's user cache dir for cellmorph."""
    env = os.environ.get("CELLMORPH_HOME")
    if env:
        home = Path(env).expanduser()
        if home.exists() and not home.is_dir():
            raise CellmorphError(f"$CELLMORPH_HOME {home}: is a file, not a folder; point it at a folder "
                                 "(the weights cache goes into its weights/ subfolder)")
        return home
    import platformdirs

    return Path(platformdirs.user_cache_dir("cellmorph"))


def weights_dir(model: str | None = None) -> Path:
    root = cellmorph_home() / "weights"
    return root / model if model else root


def _read_manifest(mdir: Path) -> dict | None:
    path = mdir / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise ValueError("no 'files' mapping")
        return data
    except Exception as exc:
        raise CellmorphError(f"{path}: unreadable weights manifest ({_one_line(exc)}); re-import the file") from None


def _write_json_atomic(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def import_weights(
    path: Path,
    model: str,
    *,
    _source: str = "import",
    _extra: dict | None = None,
    _check: bool = True,
) -> Path:
    """Copy a state dict obtained elsewhere into the cache (``<home>/weights/<model>/``) + manifest.

    The file is read with ``weights_only=True`` (pickles carrying code are refused) and must fit
    ``timm.create_model(model, pretrained=False, num_classes=1000)`` key for key and shape for
    shape, its ImageNet classifier included: a fine-tuned model's state dict (another head) is not
    ImageNet weights, and ``weights verify`` would refuse it later. Returns the cached file's path.
    """
    path = Path(path).expanduser()
    check_model_name(model)
    require_weights_file(path)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CellmorphError(f"{path}: expected one of {', '.join(WEIGHT_SUFFIXES)}")
    layout = "timm"
    if _check:
        import timm

        sd = extract_state_dict(load_state_dict_file(path), str(path))
        net = timm.create_model(model, pretrained=False, num_classes=IMAGENET_CLASSES)
        layout = detect_layout(sd, net, _allowed_layouts(model))
        to_timm_state_dict(sd, net, layout, False, str(path), model)  # the backbone first: its errors say more
        _check_imagenet_head(sd, net, layout, str(path), model)
        mapped = to_timm_state_dict(sd, net, layout, True, str(path), model)
        _load_mapped(net, mapped, True, str(path))
    digest = sha256_file(path)
    dest_dir = weights_dir(model)
    require_output_dir(dest_dir, "weights cache ($CELLMORPH_HOME/weights)")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{model}-{digest[:12]}{path.suffix}"
    if not (dest.is_file() and sha256_file(dest) == digest):
        with atomic_path(dest) as tmp:
            shutil.copyfile(path, tmp)
    manifest = _read_manifest(dest_dir) or {"model": model, "files": {}}
    entry = {
        "sha256": digest,
        "size": dest.stat().st_size,
        "layout": layout,
        "source": _source,
        "imported_from": str(path.resolve()) if _source == "import" else None,
        "imported_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    entry.update(_extra or {})
    manifest["files"][dest.name] = entry
    manifest["default"] = dest.name
    _write_json_atomic(dest_dir / MANIFEST, manifest)
    return dest
