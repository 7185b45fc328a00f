"""The model bundle: everything ``predict`` needs to process a new screen as training did.

::

    MODEL/
      bundle.json            format, backbone, classes, input spec, preprocessing recipe (the
                             training cache's manifest: channels, normalisation, 8-bit scaling,
                             tiles), training config and seeds, data fingerprint, provenance, and
                             the sha256 of every other file
      weights.safetensors    the network's weights (safetensors: tensors only, no pickle)
      calibration_<level>.parquet   optional, for level treatments, wells and tiles: out-of-fold
                             probabilities (Metadata_* + prob_<class>) of compounds the scoring
                             models never saw

A bundle is written into a temporary folder and renamed into place, so a folder named
``MODEL`` is always complete. Loading checks every file's sha256 before reading it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from cellmorph.errors import CellmorphError
from cellmorph.models.spec import InputSpec
from cellmorph.runinfo import require_output_dir, run_info

BUNDLE_FORMAT = 1
MANIFEST = "bundle.json"
WEIGHTS = "weights.safetensors"
LEVELS = ("treatments", "wells", "tiles")  # the aggregation levels, each with its own calibration scores


def calibration_file(level: str) -> str:
    return f"calibration_{level}.parquet"


@dataclass
class Bundle:
    """A loaded bundle: the network's description and weights, and the calibration scores."""

    root: Path
    manifest: dict
    weights: dict[str, torch.Tensor]
    calibration: dict[str, pd.DataFrame]  # level → scores; empty without calibration

    @property
    def model_name(self) -> str:
        return self.manifest["model"]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def input(self) -> InputSpec:
        return InputSpec.from_record(self.manifest["input"])

    @property
    def recipe(self) -> dict:
        """The training cache's preprocessing: channels, tile shape, ``PrepareConfig`` and its hash."""
        return dict(self.manifest["preprocessing"])

    @property
    def training_compounds(self) -> list[str] | None:
        """The compounds the final model was trained on; bundles that predate the record give the
        calibration CV's compounds, which came from the same cache (None without either)."""
        recorded = self.manifest["training"].get("compounds")
        if recorded is not None:
            return list(recorded)
        scores = self.calibration.get("treatments")
        return None if scores is None else sorted(map(str, set(scores["Metadata_Compound"])))

    @property
    def calibration_cv(self) -> str | None:
        record = self.manifest["training"].get("calibration")
        return None if not record else record["cv"]

    @property
    def calibration_compound_disjoint(self) -> bool:
        """Whether the calibration scores come from models that never saw their compounds (a
        loco, group-kfold or nscb CV); True without calibration, where no sets are made."""
        from cellmorph.cv.splits import parse_cv

        record = self.manifest["training"].get("calibration") or {}
        if "compound_disjoint" in record:
            return bool(record["compound_disjoint"])
        return parse_cv(record["cv"]).compound_disjoint if record.get("cv") else True

    def network(self) -> nn.Module:
        """The trained network in eval mode (built without any pretrained download)."""
        from cellmorph.models import create_model

        drop_rate = float(self.manifest["training"]["config"].get("drop_rate", 0.0))
        module = create_model(self.model_name, len(self.classes), init="xavier", in_chans=self.input.channels,
                              drop_rate=drop_rate)
        module.load_state_dict(self.weights)
        return module.eval()


def sha256_file(path: Path) -> str:
    from cellmorph.models.weights import sha256_file as digest

    return digest(path)


def save_bundle(
    out: Path,
    state: dict[str, torch.Tensor],
    model_name: str,
    classes: list[str],
    input_spec: InputSpec,
    preprocessing: dict,
    training: dict,
    calibration: dict[str, pd.DataFrame] | None = None,
) -> Path:
    """Write a bundle to ``out`` (a new folder; an existing one is replaced only when complete)."""
    from safetensors.torch import save_file

    out = require_output_dir(Path(out), "model folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
        files = [WEIGHTS]
        for level, scores in (calibration or {}).items():
            if level not in LEVELS:
                raise ValueError(f"calibration level {level!r} is not one of {LEVELS}")
            scores.to_parquet(tmp / calibration_file(level), index=False)
            files.append(calibration_file(level))
        manifest = {
            "format": BUNDLE_FORMAT,
            "model": model_name,
            "classes": list(classes),
            "input": input_spec.record(),
            "preprocessing": preprocessing,
            "training": training,
            "files": {name: sha256_file(tmp / name) for name in files},
            "provenance": run_info(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        _share_like_any_file(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _share_like_any_file(folder: Path) -> None:
    """mkdtemp makes a private 0700 folder; a bundle gets the permissions of any new folder/file."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def load_bundle(path: Path) -> Bundle:
    """Read and verify a bundle; a missing or altered file is one clear error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise CellmorphError(f"{root}: not a model folder (train one with `cellmorph train`)")
    if not manifest_path.is_file():
        raise CellmorphError(f"{manifest_path}: missing; {root} is not a complete model bundle")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise CellmorphError(f"{manifest_path}: not valid JSON ({exc.msg})") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise CellmorphError(f"{manifest_path}: bundle format {manifest.get('format')!r}, expected {BUNDLE_FORMAT}")
    for name, expected in manifest.get("files", {}).items():
        file = root / name
        if not file.is_file():
            raise CellmorphError(f"{file}: missing from the model bundle")
        if sha256_file(file) != expected:
            raise CellmorphError(f"{file}: sha256 differs from the bundle's record (altered or damaged file)")
    if WEIGHTS not in manifest.get("files", {}):
        raise CellmorphError(f"{manifest_path}: records no {WEIGHTS}")
    try:
        weights = load_file(str(root / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CellmorphError(f"{root / WEIGHTS}: not a safetensors file ({exc})") from None
    calibration = {level: pd.read_parquet(root / calibration_file(level))
                   for level in LEVELS if calibration_file(level) in manifest["files"]}
    return Bundle(root, manifest, weights, calibration)
