"""The model bundle: everything ``predict`` needs to process a new screen as training did.

::

    MODEL/
      bundle.json            format, backbone, classes, input spec, preprocessing recipe (the
                             training cache's manifest: channels, normalisation, 8-bit scaling,
                             tiles), training config and seeds, data fingerprint, provenance, the
                             sha256 of every other file (``files``) and of each of its own entries
                             (``content_sha256``)
      weights.safetensors    the network's weights (safetensors: tensors only, no pickle); for a linear
                             probe, its frozen backbone's, without the ImageNet classifier
      head.safetensors       a linear probe's head (:class:`~cellmorph.models.heads.LinearProbeHead`);
                             an ensemble's further members have ``weights-<k>``/``head-<k>`` files
      calibration_<level>.parquet   optional, for level treatments, wells and tiles: out-of-fold
                             probabilities (Metadata_* + prob_<class>) of compounds the scoring
                             models never saw
      novelty_<level>.parquet   a centroid probe's Novel calibration: Novelty_Score of each training
                             compound, scored by a head fitted without it (wells, treatments, compounds)
      novelty_control.safetensors   optional beside them: the controls' mean profile and the MoAs seen
                             from it (:class:`~cellmorph.novelty.ControlOrigin`), the score's second origin

A bundle is written into a temporary folder and renamed into place, so a folder named
``MODEL`` is always complete. Loading refuses, with one line naming ``bundle.json`` and the
field, anything but a bundle as ``train`` wrote it: ``bundle.json`` is validated entry by entry
(:class:`BundleDocument`), each entry must still have the sha256 recorded for it in
``content_sha256``, every file named in ``files`` must lie in the folder itself (no path, no link
out of it: checked before anything is opened) and have its recorded sha256, and the weights must
be those of ``model``'s network with one output per class and one input per channel.

``content_sha256`` holds one digest per entry, not one for the whole document, so that an edit is
reported by the entry it changed. It is the sha256 of the entry's canonical JSON (sorted keys, no
spaces, :func:`canonical_json`). Like ``files``, it detects edited or damaged bundles, not forged
ones: whoever can write the folder can recompute it. Bundles from releases before it have no
``content_sha256``; they load after the same validation.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from cellmorph.calibration import class_names_problem
from cellmorph.config.augment import TTAMode
from cellmorph.config.scheme import parse_cv
from cellmorph.errors import CellmorphError, validated
from cellmorph.models.spec import InputSpec
from cellmorph.runinfo import atomic_dir, json_safe, require_output_dir, run_info
from cellmorph.schema import TRUE_COLUMN, prob_column

if TYPE_CHECKING:
    from cellmorph.novelty import ControlOrigin

BUNDLE_FORMAT = 1
# An ensemble's bundle: the document's own network is the first member, ``members`` lists the others.
# A format of its own, so that a release that knows no members refuses it instead of predicting with the
# first member alone.
ENSEMBLE_FORMAT = 2
# A bundle with a linear probe among its networks (a frozen backbone, its feature spec and a linear head):
# a format of its own, so that a release that knows no probes refuses it instead of misreading its weights.
PROBE_FORMAT = 3
SUPPORTED_FORMATS = (BUNDLE_FORMAT, ENSEMBLE_FORMAT, PROBE_FORMAT)
MANIFEST = "bundle.json"
WEIGHTS = "weights.safetensors"
CONTENT_DIGESTS = "content_sha256"  # entry of bundle.json → sha256 of its canonical JSON
LEVELS = ("treatments", "wells", "tiles")  # the aggregation levels, each with its own calibration scores
# Network input sizes a bundle may record: cv's own minimum (CVConfig.image_size), and a bound far
# above any cell tile that keeps an edited size from allocating tiles of gigabytes.
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 4096


def member_weights_file(k: int) -> str:
    """The weights file of an ensemble's member ``k`` (from 2; the first member's is :data:`WEIGHTS`)."""
    return f"weights-{k}.safetensors"


def probe_head_file(k: int) -> str:
    """The head file of a linear probe, member ``k`` (1: the document's own network)."""
    return "head.safetensors" if k == 1 else f"head-{k}.safetensors"


def novelty_file(level: str, k: int) -> str:
    """The Novel flag's calibration scores of ``level`` from a linear probe, member ``k``."""
    return f"novelty_{level}.parquet" if k == 1 else f"novelty-{k}_{level}.parquet"


def novelty_control_file(k: int) -> str:
    """The novelty score's control origin (:class:`~cellmorph.novelty.ControlOrigin`) of a linear probe, member ``k``."""
    return "novelty_control.safetensors" if k == 1 else f"novelty_control-{k}.safetensors"


def calibration_file(level: str) -> str:
    return f"calibration_{level}.parquet"


# --------------------------------------------------------------------------- the bundle.json document
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Entry(BaseModel):
    # strict: an edited "32" or true is refused, not coerced; extra: a later release may add fields
    model_config = ConfigDict(strict=True, extra="allow")


class InputRecord(_Entry):
    """``input``: :meth:`InputSpec.record`."""

    mean: list[FiniteFloat] = Field(min_length=1)
    std: list[Annotated[float, Field(gt=0.0, allow_inf_nan=False)]] = Field(min_length=1)
    input_size: int = Field(ge=MIN_INPUT_SIZE, le=MAX_INPUT_SIZE)

    @model_validator(mode="after")
    def _one_std_per_mean(self):
        if len(self.std) != len(self.mean):
            raise ValueError(f"{len(self.mean)} means but {len(self.std)} standard deviations (one of each per channel)")
        return self


class PreprocessingRecord(_Entry):
    """``preprocessing``: the training cache's recipe; empty in a bundle saved without one (it
    cannot ``predict``, which says so)."""

    source: str | None = None
    channels: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    tile_shape: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=3, max_length=3)
    config: dict | None = None
    config_hash: str | None = None


class TrainingConfigRecord(_Entry):
    """The fields of ``training.config`` (a ``CVConfig``) that loading and predicting read."""

    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)
    tta: TTAMode = "none"
    aggregate: Literal["median", "mean", "logmean"] = "median"


class CalibrationRecord(_Entry):
    cv: str
    compound_disjoint: bool | None = None

    @field_validator("cv")
    @classmethod
    def _a_cv_scheme(cls, value: str) -> str:
        try:
            parse_cv(value)
        except CellmorphError as exc:
            raise ValueError(str(exc)) from None
        return value


class ProbeRecord(_Entry):
    """``probe`` (of the document, or of a member): the network is a linear probe. Its weights are the frozen
    backbone's (no classifier); ``features`` names the profile it reads (:class:`FeatureSpec`'s text form),
    ``head`` the kind of head that was fitted, ``head_weights`` the file of its linear form."""

    features: str
    head: Literal["centroid", "logistic"]
    head_weights: str
    # level (wells, treatments) → the file of the Novel flag's calibration scores (held-out known compounds)
    novelty: dict[Literal["wells", "treatments", "compounds"], str] | None = None
    # the file of the novelty score's control origin (the controls' mean profile); None: the average cell alone
    novelty_control: str | None = None

    @field_validator("features")
    @classmethod
    def _a_feature_spec(cls, value: str) -> str:
        from pydantic import ValidationError

        from cellmorph.config.features import FeatureSpec

        try:
            FeatureSpec.model_validate(value)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"]) from None
        return value


class MemberRecord(_Entry):
    """One further member of an ensemble (``members``): its network, input, scoring settings and weights file."""

    model: str = Field(min_length=1)
    input: InputRecord
    config: TrainingConfigRecord = Field(default_factory=TrainingConfigRecord)
    weights: str
    seeds: dict | None = None
    n_train_tiles: int | None = None
    probe: ProbeRecord | None = None


class TrainingRecord(_Entry):
    config: TrainingConfigRecord = Field(default_factory=TrainingConfigRecord)
    compounds: list[str] | None = None
    calibration: CalibrationRecord | None = None


class BundleDocument(_Entry):
    """``bundle.json``: each entry's type and range, and the rules between them."""

    format: Literal[1, 2, 3]
    model: str = Field(min_length=1)
    classes: list[str]
    input: InputRecord
    preprocessing: PreprocessingRecord
    training: TrainingRecord
    files: dict[str, Sha256]
    provenance: dict | None = None
    content_sha256: dict[str, Sha256] | None = None
    members: list[MemberRecord] | None = None
    probe: ProbeRecord | None = None

    @field_validator("classes")
    @classmethod
    def _usable_classes(cls, classes: list[str]) -> list[str]:
        problem = class_names_problem(classes)
        if problem:
            raise ValueError(problem)
        return classes

    @field_validator("files")
    @classmethod
    def _files_of_the_folder(cls, files: dict[str, str]) -> dict[str, str]:
        for name in files:
            if not _plain_file_name(name):
                raise ValueError(f"{name!r} is not the name of a file in the bundle folder (paths are refused)")
        if WEIGHTS not in files:
            raise ValueError(f"records no {WEIGHTS}")
        return files

    @model_validator(mode="after")
    def _one_channel_list(self):
        channels = self.preprocessing.channels
        if channels is not None and len(channels) != len(self.input.mean):
            raise ValueError(f"input: {len(self.input.mean)} channels (mean, std), but preprocessing.channels "
                             f"names {len(channels)}")
        return self

    @model_validator(mode="after")
    def _members_of_an_ensemble(self):
        probes = [self.probe] + [m.probe for m in self.members or []]
        expected = PROBE_FORMAT if any(probes) else ENSEMBLE_FORMAT if self.members else BUNDLE_FORMAT
        if self.format != expected:
            raise ValueError(f"format {self.format} with {len(self.members or [])} further member(s) and "
                             f"{sum(map(bool, probes))} linear probe(s): such a bundle is of format {expected} "
                             f"({BUNDLE_FORMAT}: one network, {ENSEMBLE_FORMAT}: an ensemble, {PROBE_FORMAT}: "
                             "with a linear probe)")
        own = [WEIGHTS] + ([self.probe.head_weights] if self.probe else [])
        for k, member in enumerate(self.members or [], start=2):
            if member.weights not in self.files or member.weights in own:
                raise ValueError(f"members: member {k}'s weights {member.weights!r} are not a file of its own in files")
            if len(member.input.mean) != len(self.input.mean):
                raise ValueError(f"members: member {k} takes {len(member.input.mean)} channels, the first "
                                 f"{len(self.input.mean)}: an ensemble's members read the same tiles")
            own += [member.weights] + ([member.probe.head_weights] if member.probe else [])
        for k, probe in enumerate(probes, start=1):
            where = "probe" if k == 1 else f"members: member {k}'s probe"
            if probe is not None and (probe.head_weights not in self.files or own.count(probe.head_weights) > 1):
                raise ValueError(f"{where}: head_weights {probe.head_weights!r} is not a file of its own in files")
            for level, name in ((probe.novelty or {}) if probe is not None else {}).items():
                if name not in self.files or name in own:
                    raise ValueError(f"{where}: novelty {level} {name!r} is not a file of its own in files")
            name = probe.novelty_control if probe is not None else None
            if name is not None and (name not in self.files or name in own or not probe.novelty):
                raise ValueError(f"{where}: novelty_control {name!r} is not a file of its own in files, beside "
                                 "novelty scores")
        return self


def _plain_file_name(name: str) -> bool:
    """Whether ``name`` names a file directly in the bundle folder: no folder part, no absolute
    path, no ``..``, no NUL (bundle.json is input, so its names are confined before any is opened)."""
    return (bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name
            and not os.path.isabs(name))


def canonical_json(value) -> bytes:
    """The one byte form of a JSON value that its digest is taken of: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def content_digests(manifest: dict) -> dict[str, str]:
    """The sha256 of every entry of ``manifest`` (a parsed bundle.json) but ``content_sha256``."""
    return {key: hashlib.sha256(canonical_json(value)).hexdigest()
            for key, value in manifest.items() if key != CONTENT_DIGESTS}


@dataclass
class BundleMember:
    """One network of a bundle (an ensemble has several): what ``predict`` runs, and how."""

    model_name: str
    input: InputSpec
    config: dict  # training.config's scoring fields: tta, drop_rate, aggregate
    weights: dict[str, torch.Tensor]
    n_classes: int
    probe: dict | None = None  # a linear probe's record (:class:`ProbeRecord`); None for a trained network
    head: dict[str, torch.Tensor] | None = None  # a linear probe's head tensors

    @property
    def scoring_tta(self) -> str:
        """The TTA ``predict`` asks of its scoring loop: a probe averages its profile over the views itself."""
        return "none" if self.probe else str(self.config.get("tta", "none"))

    def network(self) -> nn.Module:
        """The trained network in eval mode (built without any pretrained download): for a linear probe, a
        :class:`~cellmorph.models.heads.ProbeNetwork` (frozen backbone, profile, linear head, TTA of the profile)."""
        from cellmorph.models import network_from_weights

        if self.probe:
            from cellmorph.config.features import FeatureSpec
            from cellmorph.models.features import FeatureExtractor
            from cellmorph.models.heads import LinearProbeHead, ProbeNetwork

            backbone = network_from_weights(self.model_name, 1, self.input.channels, self.weights, classifier=False)
            extractor = FeatureExtractor(backbone, FeatureSpec.model_validate(self.probe["features"]), self.model_name)
            return ProbeNetwork(extractor, LinearProbeHead.from_state(self.head), self.n_classes,
                                str(self.config.get("tta", "none"))).eval()
        return network_from_weights(self.model_name, self.n_classes, self.input.channels, self.weights,
                                    float(self.config.get("drop_rate", 0.0)))


@dataclass
class Bundle:
    """A loaded bundle: the network's description and weights, and the calibration scores."""

    root: Path
    manifest: dict
    weights: dict[str, torch.Tensor]
    calibration: dict[str, pd.DataFrame]  # level → scores; empty without calibration
    further_weights: list[dict[str, torch.Tensor]] = field(default_factory=list)  # an ensemble's members 2, 3, …
    heads: list[dict[str, torch.Tensor] | None] = field(default_factory=list)  # each member's probe head, or None
    # The Novel flag's calibration scores per level (``Novelty_Score`` of compounds of known MoAs, each held out from
    # the probe that scored it), from the first linear probe that holds them; {} without.
    novelty: dict[str, pd.DataFrame] = field(default_factory=dict)
    novelty_member: int | None = None  # which member (from 0) the novelty scores belong to
    novelty_control: ControlOrigin | None = None  # that member's control origin, where it has one

    @property
    def members(self) -> list[BundleMember]:
        """The networks to run, the document's own first (one for a bundle that is no ensemble)."""
        n = len(self.classes)
        heads = self.heads or [None] * (1 + len(self.further_weights))
        first = BundleMember(self.model_name, self.input, dict(self.manifest["training"]["config"]), self.weights, n,
                             self.manifest.get("probe"), heads[0])
        return [first] + [BundleMember(m["model"], InputSpec.from_record(m["input"]), dict(m.get("config") or {}),
                                       weights, n, m.get("probe"), head)
                          for m, weights, head in zip(self.manifest.get("members") or [], self.further_weights,
                                                      heads[1:])]

    @property
    def is_probe(self) -> bool:
        """Whether every network of the bundle is a linear probe (none was trained)."""
        return all(m.probe for m in self.members)

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
        record = self.manifest["training"].get("calibration") or {}
        if record.get("compound_disjoint") is not None:
            return bool(record["compound_disjoint"])
        return parse_cv(record["cv"]).compound_disjoint if record.get("cv") else True

    def network(self) -> nn.Module:
        """The (first member's) trained network in eval mode (built without any pretrained download)."""
        return self.members[0].network()


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
    members: list[dict] | None = None,
    probe: dict | None = None,
) -> Path:
    """Write a bundle to ``out`` (a new folder; an existing one is replaced only when complete).

    ``members``: an ensemble's further members, each ``state``, ``model``, ``input`` (InputSpec), ``config``
    (its training config's scoring fields) and optionally ``seeds``, ``n_train_tiles`` and ``probe``.
    ``probe`` (of the first network, or of a member): a linear probe's ``features`` (text form), ``head`` (its
    kind) and ``head_state`` (:meth:`LinearProbeHead.state`); ``state`` is then its frozen backbone's."""
    out = require_output_dir(Path(out), "model folder")
    with atomic_dir(out) as tmp:
        files = _BundleFiles(tmp)
        files.tensors(state, WEIGHTS)
        own_probe = files.probe_record(probe, 1)
        records = [files.member_record(member, k) for k, member in enumerate(members or [], start=2)]
        for level, scores in (calibration or {}).items():
            if level not in LEVELS:
                raise ValueError(f"calibration level {level!r} is not one of {LEVELS}")
            files.table(scores, calibration_file(level))
        any_probe = own_probe is not None or any("probe" in r for r in records)
        manifest = {
            "format": PROBE_FORMAT if any_probe else ENSEMBLE_FORMAT if records else BUNDLE_FORMAT,
            "model": model_name,
            "classes": list(classes),
            "input": input_spec.record(),
            "preprocessing": preprocessing,
            "training": training,
            "files": files.digests(),
            "provenance": run_info(),
        } | ({"members": records} if records else {}) | ({"probe": own_probe} if own_probe else {})
        _write_manifest(tmp / MANIFEST, manifest, str(out / MANIFEST))
        _share_like_any_file(tmp)
    return out


class _BundleFiles:
    """The files written so far into a bundle's temporary ``folder``, in the order ``files`` lists them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.names: list[str] = []

    def tensors(self, tensors: dict[str, torch.Tensor], name: str) -> str:
        from safetensors.torch import save_file

        save_file({key: v.detach().cpu().contiguous() for key, v in tensors.items()}, str(self.folder / name))
        self.names.append(name)
        return name

    def table(self, frame: pd.DataFrame, name: str) -> str:
        frame.to_parquet(self.folder / name, index=False)
        self.names.append(name)
        return name

    def probe_record(self, given: dict | None, k: int) -> dict | None:
        """The manifest entry of network ``k``'s linear probe (None without one), its head and novelty scores
        written."""
        if not given:
            return None
        record = {"features": str(given["features"]), "head": given["head"],
                  "head_weights": self.tensors(given["head_state"], probe_head_file(k))}
        if given.get("novelty"):
            record["novelty"] = {level: self.table(scores, novelty_file(level, k))
                                 for level, scores in given["novelty"].items()}
            if given.get("novelty_control"):
                record["novelty_control"] = self.tensors(given["novelty_control"], novelty_control_file(k))
        return record

    def member_record(self, member: dict, k: int) -> dict:
        """The ``members`` entry of an ensemble's member ``k`` (from 2), its weights (and probe) written."""
        name = self.tensors(member["state"], member_weights_file(k))
        return ({"model": member["model"], "input": member["input"].record(), "config": member["config"],
                 "weights": name, "seeds": member.get("seeds"), "n_train_tiles": member.get("n_train_tiles")}
                | ({"probe": self.probe_record(member["probe"], k)} if member.get("probe") else {}))

    def digests(self) -> dict[str, str]:
        return {name: sha256_file(self.folder / name) for name in self.names}


def _write_manifest(path: Path, manifest: dict, shown_as: str) -> None:
    """Write ``bundle.json``, validated as load will read it and with the digest of each entry."""
    # The digests are of the document as it is read back: JSON types only, and null where a
    # value is NaN (a fold without held-out tiles), since bare NaN is not JSON.
    document = json.loads(json.dumps(json_safe(manifest), default=str, allow_nan=False))
    validated(BundleDocument, document, shown_as)  # never write a bundle that load refuses
    document[CONTENT_DIGESTS] = content_digests(document)
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def _share_like_any_file(folder: Path) -> None:
    """mkdtemp makes a private 0700 folder; a bundle gets the permissions of any new folder/file."""
    from cellmorph.runinfo import share_like_new

    for path in [folder, *folder.iterdir()]:
        share_like_new(path)


def load_bundle(path: Path) -> Bundle:
    """Read and verify a bundle; a missing, altered or misplaced file, or an edited or
    inconsistent bundle.json, is one clear error naming the file and the field."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise CellmorphError(f"{root}: not a model folder (train one with `cellmorph train`)")
    if not manifest_path.is_file():
        raise CellmorphError(f"{manifest_path}: missing; {root} is not a complete model bundle")
    _require_inside(root, manifest_path)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CellmorphError(f"{manifest_path}: not a UTF-8 text file (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise CellmorphError(f"{manifest_path}: not valid JSON ({exc.msg})") from None
    if not isinstance(manifest, dict):
        raise CellmorphError(f"{manifest_path}: not a JSON object (a model bundle's record is one)")
    if manifest.get("format") not in SUPPORTED_FORMATS:
        raise CellmorphError(f"{manifest_path}: bundle format {manifest.get('format')!r}, expected one of "
                             f"{', '.join(map(str, SUPPORTED_FORMATS))}")
    document = validated(BundleDocument, manifest, str(manifest_path))
    for name in document.files:  # every path is confined before any file is opened
        _require_inside(root, root / name)
    _check_content_digests(manifest, manifest_path)
    for name, expected in document.files.items():
        file = root / name
        if not file.is_file():
            raise CellmorphError(f"{file}: missing from the model bundle")
        if sha256_file(file) != expected:
            raise CellmorphError(f"{file}: sha256 differs from the bundle's record (altered or damaged file)")
    def read_weights(name: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(root / name))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CellmorphError(f"{root / name}: not a safetensors file ({exc})") from None

    weights = read_weights(WEIGHTS)
    n_classes = len(document.classes)
    _check_network(document.model, n_classes, len(document.input.mean), weights, WEIGHTS, manifest_path,
                   probe=document.probe)
    heads = [_read_probe_head(root, document.model, n_classes, len(document.input.mean), document.probe,
                              manifest_path, "probe: ", read_weights)]
    further = []
    for k, member in enumerate(document.members or [], start=2):
        further.append(read_weights(member.weights))
        _check_network(member.model, n_classes, len(member.input.mean), further[-1], member.weights,
                       manifest_path, f"members: member {k}: ", probe=member.probe)
        heads.append(_read_probe_head(root, member.model, n_classes, len(member.input.mean), member.probe,
                                      manifest_path, f"members: member {k}: probe: ", read_weights))
    calibration = {}
    for level in LEVELS:
        if calibration_file(level) in document.files:
            calibration[level] = _read_calibration(root / calibration_file(level), document, manifest_path, level)
    novelty, novelty_member, control = {}, None, None
    for k, probe in enumerate([document.probe] + [m.probe for m in document.members or []]):
        if probe is not None and probe.novelty and novelty_member is None:
            novelty_member = k
            novelty = {level: _read_novelty(root / name, manifest_path) for level, name in probe.novelty.items()}
            if probe.novelty_control is not None:
                control = _read_control_origin(read_weights(probe.novelty_control), heads[k], probe.novelty_control,
                                               manifest_path)
    return Bundle(root, manifest, weights, calibration, further, heads, novelty, novelty_member, control)


def _read_control_origin(state: dict[str, torch.Tensor], head: dict[str, torch.Tensor] | None, name: str,
                         where: Path):
    """A probe's control origin, checked against its head (as many centroids, as long profiles)."""
    from cellmorph.novelty import ControlOrigin

    if set(state) != {"control_profile", "control_centroids"} or head is None:
        raise CellmorphError(f"{where}: probe: novelty_control: {name} must hold exactly control_profile and "
                             "control_centroids, beside a probe head")
    control = ControlOrigin.from_state(state)
    problem = control.problem(*head["weight"].shape)
    if problem:
        raise CellmorphError(f"{where}: probe: novelty_control: {name}: {problem}")
    return control


def _read_novelty(path: Path, where: Path) -> pd.DataFrame:
    """One level's novelty calibration scores: finite ``Novelty_Score`` values, at least one."""
    import numpy as np

    from cellmorph.novelty import NOVELTY_COLUMN

    try:
        scores = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise CellmorphError(f"{path}: not a readable parquet file ({' '.join(str(exc).split())})") from None
    values = scores[NOVELTY_COLUMN].to_numpy() if NOVELTY_COLUMN in scores.columns else None
    if values is None or len(values) == 0 or not np.issubdtype(values.dtype, np.number) or \
            not np.isfinite(values).all():
        raise CellmorphError(f"{where}: probe: novelty: {path.name} holds no finite {NOVELTY_COLUMN} column")
    return scores


def _read_probe_head(root: Path, model: str, n_classes: int, n_channels: int, probe: "ProbeRecord | None",
                     where: Path, field_name: str, read_weights) -> dict[str, torch.Tensor] | None:
    """A linear probe's head tensors, checked against the classes and the backbone's profile length."""
    from cellmorph.config.features import FeatureSpec
    from cellmorph.models.features import FeatureExtractor
    from cellmorph.models.heads import probe_head_problem

    if probe is None:
        return None
    head = read_weights(probe.head_weights)
    spec = FeatureSpec.model_validate(probe.features)
    skeleton = _network_skeleton(model, 0, n_channels)
    try:
        dim = skeleton.num_features if spec.is_head else FeatureExtractor(skeleton, spec, model).dim
    except CellmorphError as exc:
        raise CellmorphError(f"{where}: {field_name}features: {exc}") from None
    problem = probe_head_problem(head, n_classes, dim)
    if problem:
        raise CellmorphError(f"{where}: {field_name}head_weights: {root / probe.head_weights} is not the head of a "
                             f"probe of {n_classes} classes on {model}'s {spec.describe()} features ({problem})")
    return head


def _require_inside(root: Path, file: Path) -> None:
    """``file`` must be in the bundle folder itself, also once links are followed: a bundle is
    input, and a link in it must not make loading read (and hash) a file elsewhere."""
    if file.is_symlink() and file.resolve().parent != root.resolve():
        raise CellmorphError(f"{file}: a link to {file.resolve()}, outside the model bundle; "
                             "a bundle holds its files itself")


def _check_content_digests(manifest: dict, where: Path) -> None:
    """Each entry of bundle.json must still be as written (bundles that predate the digests have none)."""
    recorded = manifest.get(CONTENT_DIGESTS)
    if recorded is None:
        return
    actual = content_digests(manifest)
    for key in sorted(set(recorded) | set(actual)):
        if key not in actual:
            raise CellmorphError(f"{where}: {key}: missing, but its sha256 is recorded in {CONTENT_DIGESTS} "
                                 "(an edited or damaged bundle.json; restore the bundle or train it again)")
        if key not in recorded:
            raise CellmorphError(f"{where}: {key}: not in {CONTENT_DIGESTS}, so added after the bundle was "
                                 "written (an edited bundle.json; restore the bundle or train it again)")
        if recorded[key] != actual[key]:
            raise CellmorphError(f"{where}: {key}: differs from the sha256 recorded in {CONTENT_DIGESTS} "
                                 "(an edited or damaged bundle.json; restore the bundle or train it again)")


def _check_network(model: str, n_classes: int, n_channels: int, weights: dict[str, torch.Tensor], file: str,
                   where: Path, member: str = "", probe=None) -> None:
    """The weights in ``file`` must be those of ``model``'s network with one output per class and one
    input per channel: every tensor by name and shape, else the field that disagrees (``member`` says
    which member of an ensemble)."""
    from cellmorph.models.weights import check_model_name, classifier_keys, first_conv_key

    where = f"{where}: {member}" if member else f"{where}: "
    try:
        check_model_name(model)
    except CellmorphError as exc:
        raise CellmorphError(f"{where}model: {exc}") from None
    # a linear probe's weights are its frozen backbone's, without a classifier
    network = _network_skeleton(model, 0 if probe is not None else n_classes, n_channels)
    expected = {key: tuple(value.shape) for key, value in network.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in weights.items()}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CellmorphError(f"{where}model: {file} holds no {model} network ({len(missing)} tensors "
                             f"missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    head, first_conv = set(classifier_keys(network)), first_conv_key(network)
    for key in expected:
        if found[key] == expected[key]:
            continue
        if key in head:
            raise CellmorphError(f"{where}classes: {n_classes} classes, but the classifier in {file} has "
                                 f"{found[key][0]} outputs ({key} {found[key]})")
        if key == first_conv and len(found[key]) == 4 and found[key][0] == expected[key][0]:
            raise CellmorphError(f"{where}input: {n_channels} channels (mean, std), but the first convolution in "
                                 f"{file} takes {found[key][1]} ({key} {found[key]})")
        raise CellmorphError(f"{where}model: {file} does not fit {model}: {key} is {found[key]} "
                             f"there, {expected[key]} in the network")


def _network_skeleton(name: str, n_classes: int, n_channels: int) -> nn.Module:
    """``name``'s network for its tensor names and shapes only: on the meta device, so no memory is
    allocated and nothing initialised (a model that cannot be built there is built on the CPU)."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, num_classes=n_classes, in_chans=n_channels)
    except Exception:  # an architecture whose constructor reads tensor values
        return timm.create_model(name, pretrained=False, num_classes=n_classes, in_chans=n_channels)


def _read_calibration(path: Path, document: BundleDocument, where: Path, level: str) -> pd.DataFrame:
    """One level's calibration scores: ``prob_<class>`` for every class and the true MoA."""
    try:
        scores = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise CellmorphError(f"{path}: not a readable parquet file ({' '.join(str(exc).split())})") from None
    absent = [prob_column(c) for c in document.classes if prob_column(c) not in scores.columns]
    if absent:
        raise CellmorphError(f"{where}: classes: the {level} calibration scores ({path.name}) have no {absent[0]} "
                             f"column: they are of other classes than {len(document.classes)} named")
    needed = [TRUE_COLUMN] + (["Metadata_Compound"] if level == "treatments" and document.training.compounds is None
                              else [])
    for column in needed:
        if column not in scores.columns:
            raise CellmorphError(f"{path}: no {column} column, which calibration scores have for every row")
    return scores
