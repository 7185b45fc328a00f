"""`cellmorph train` and the model bundle: saved, verified, loaded in a new process, identical."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cellmorph.bundle import CONTENT_DIGESTS, LEVELS, MANIFEST, WEIGHTS, calibration_file, content_digests, load_bundle
from cellmorph.errors import CellmorphError
from tests.bundle_helpers import edited_bundle
from tests.conftest import one_line_error, run_cli_here

from tests.conftest import QUICK_TRAIN  # noqa: E402

# Probabilities of the first 24 tiles of a cache under a bundle, as `predict` will compute them.
SCORE = """
import sys, numpy as np, torch
from cellmorph.bundle import load_bundle
from cellmorph.cache import TileCache
from cellmorph.datasets import InputPipeline
from cellmorph.train import PredictSettings, predict_tiles
torch.set_num_threads(1)
bundle = load_bundle(sys.argv[1])
probs = predict_tiles(bundle.network(), InputPipeline.from_spec(bundle.input), TileCache(sys.argv[2]),
                      np.arange(24), PredictSettings(batch_size=8), torch.device("cpu"))
np.save(sys.argv[3], probs)
"""


@pytest.fixture
def model(tiny_bundle):
    return tiny_bundle


def test_train_writes_a_complete_bundle_with_out_of_fold_calibration(model, tiny_cache):
    bundle = load_bundle(model)
    manifest = json.loads((model / MANIFEST).read_text())
    cache_manifest = json.loads((tiny_cache / "manifest.json").read_text())
    assert bundle.model_name == "test_resnet" and len(bundle.classes) == 12
    assert bundle.input.size == 32 and bundle.input.channels == 3
    assert bundle.recipe["config_hash"] == cache_manifest["config_hash"]
    assert bundle.recipe["channels"] == cache_manifest["channels"]
    assert set(manifest["files"]) == {WEIGHTS, *map(calibration_file, LEVELS)}
    assert all(len(v) == 64 for v in manifest["files"].values())
    training = manifest["training"]
    assert training["n_train_tiles"] == 40 and training["seeds"] and training["data_fingerprint"]
    assert "git_commit" in manifest["provenance"] and manifest["provenance"]["packages"]["torch"]
    # Calibration scores are the CV's out-of-fold probabilities, per treatment, well and tile.
    cv_run = str(model) + ".cv"
    written = {"treatments": pd.read_csv(cv_run + "/treatments.csv"), "wells": pd.read_csv(cv_run + "/wells.csv"),
               "tiles": pd.read_parquet(cv_run + "/predictions.parquet")}
    assert [len(bundle.calibration[level]) for level in LEVELS] == [44, 88, 352]
    for level, frame in written.items():
        probs = [c for c in frame.columns if c.startswith("prob_")]
        np.testing.assert_allclose(bundle.calibration[level][probs].to_numpy(), frame[probs].to_numpy())
    assert training["calibration"]["cv"] == "group-kfold:2"


def test_a_bundle_loaded_in_a_new_process_gives_identical_probabilities(model, tiny_cache, tmp_path):
    runs = []
    for k in range(2):
        out = tmp_path / f"probs{k}.npy"
        proc = subprocess.run([sys.executable, "-c", SCORE, str(model), str(tiny_cache), str(out)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        runs.append(np.load(out))
    assert runs[0].shape == (24, 12)
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_allclose(runs[0].sum(axis=1), 1.0, rtol=1e-5)


def _copy(model, tmp_path, name="copy"):
    import shutil

    dest = tmp_path / name
    shutil.copytree(model, dest)
    return dest


def test_an_altered_or_missing_file_is_refused(model, tmp_path):
    altered = _copy(model, tmp_path)
    data = bytearray((altered / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (altered / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CellmorphError, match=f"{WEIGHTS}: sha256 differs"):
        load_bundle(altered)
    missing = _copy(model, tmp_path, "missing")
    (missing / calibration_file("wells")).unlink()
    with pytest.raises(CellmorphError, match=f"{calibration_file('wells')}: missing from the model bundle"):
        load_bundle(missing)
    with pytest.raises(CellmorphError, match="not a model folder"):
        load_bundle(tmp_path / "nowhere")


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_weights_that_hold_pickled_code_are_never_unpickled(model, tmp_path, monkeypatch):
    evil = _copy(model, tmp_path)
    (evil / WEIGHTS).write_bytes(pickle.dumps({"conv1.weight": _Payload()}))
    manifest = json.loads((evil / MANIFEST).read_text())
    from cellmorph.bundle import sha256_file

    manifest["files"][WEIGHTS] = sha256_file(evil / WEIGHTS)  # the record matches: only the format can refuse it
    manifest[CONTENT_DIGESTS] = content_digests(manifest)
    (evil / MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CellmorphError, match="not a safetensors file"):
        load_bundle(evil)
    assert not (tmp_path / "PWNED").exists()


def test_train_output_that_is_a_file_is_one_line(tiny_cache, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    one_line_error(run_cli_here("train", "--data", tiny_cache, *QUICK_TRAIN, "--out", blocker), str(blocker), "existing file")
    assert blocker.read_text() == "keep me"


def test_train_takes_the_cv_options():
    """`train` has `cv`'s options (one shared set)."""
    from typer.main import get_command

    from cellmorph.cli import app

    options = {name: {o for p in get_command(app).commands[name].params for o in p.opts} for name in ("cv", "train")}
    assert options["cv"] - options["train"] == {"--cv", "--replicates"}


def test_train_refuses_cv_only_options_without_a_calibration_cv(tiny_cache, tmp_path):
    """--eval-epochs and --keep-checkpoints act on held-out folds; without --calibration there are none,
    so train says so instead of ignoring them."""
    for option in (["--eval-epochs", "1"], ["--keep-checkpoints", "all"]):
        one_line_error(run_cli_here("train", "--data", tiny_cache, *QUICK_TRAIN, *option, "--out", tmp_path / "m"),
                       option[0], "--calibration")
        assert not (tmp_path / "m").exists()


def test_the_bundle_records_its_training_compounds_and_whether_calibration_held_them_out(model, tiny_cache):
    from cellmorph.cache import TileCache

    bundle = load_bundle(model)
    index = TileCache(tiny_cache).index
    treated = sorted(set(index.loc[~index["Metadata_IsControl"].astype(bool), "Metadata_Compound"]))
    # the compounds of the tiles it trained on (QUICK_TRAIN subsamples 40 tiles)
    assert set(bundle.training_compounds) <= set(treated) and len(bundle.training_compounds) > 10
    assert bundle.manifest["training"]["calibration"]["compound_disjoint"] is True  # group-kfold:2
    assert bundle.calibration_compound_disjoint
    # A bundle from before these records: the calibration scores' compounds, the scheme's own property.
    training = dict(bundle.manifest["training"], calibration=dict(bundle.manifest["training"]["calibration"]))
    del training["compounds"], training["calibration"]["compound_disjoint"]
    older = type(bundle)(bundle.root, dict(bundle.manifest, training=training), bundle.weights, bundle.calibration)
    assert older.training_compounds == treated and older.calibration_compound_disjoint
    training["calibration"]["cv"] = "well:2"
    assert not older.calibration_compound_disjoint


# --------------------------------------------------------------------------- an edited or hostile bundle.json
def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_bundle_json_is_strict_json_with_a_sha256_per_entry(model):
    """No bare NaN (a browser's JSON.parse or jq reject the whole file): a missing number is null;
    and every entry's digest is recorded, so that an edit is named by its entry."""
    manifest = _strict_json((model / MANIFEST).read_text())
    assert manifest["training"]["history"][-1]["heldout_tile_accuracy"] is None  # the final model holds none out
    digests = manifest.pop(CONTENT_DIGESTS)
    assert set(digests) == set(manifest) and digests == content_digests(manifest)


def test_a_bundle_of_the_previous_release_still_loads(model, tmp_path):
    """Without content_sha256 and with a bare NaN, as releases before the digests wrote it."""
    older = edited_bundle(model, tmp_path / "older", previous_release=True)
    assert "NaN" in (older / MANIFEST).read_text()
    bundle = load_bundle(older)
    assert bundle.classes == load_bundle(model).classes and CONTENT_DIGESTS not in bundle.manifest


def _drop_class(m):
    m["classes"].pop()


def _set(path: str, value):
    def edit(m):
        *parents, last = path.split(".")
        for key in parents:
            m = m[key]
        m[last] = value
    return edit


# (edit, written as the previous release did, what the one error line names)
EDITS = {
    "a class removed": (_drop_class, False, ["classes: differs from the sha256 recorded in content_sha256"]),
    "another model": (_set("model", "resnet18"), False, ["model: differs from the sha256"]),
    "an entry added": (_set("note", "hello"), False, ["note: not in content_sha256"]),
    "an entry removed": (lambda m: m.pop("provenance"), False, ["provenance: missing, but its sha256 is recorded"]),
    "a negative input size": (_set("input.input_size", -5), False, ["input.input_size", "greater than or equal to 16"]),
    "a size as text": (_set("input.input_size", "32"), False, ["input.input_size", "valid integer"]),
    "a NaN mean": (lambda m: m["input"]["mean"].__setitem__(0, float("nan")), False, ["input.mean.0", "finite"]),
    "a class twice": (lambda m: m["classes"].__setitem__(1, m["classes"][0]), False,
                      ["classes", "'Actin disruptors' is listed more than once"]),
    "the set separator in a class": (_set("classes", ["A|B"] + [f"c{i}" for i in range(11)]), False,
                                     ["classes", "'A|B' contains '|'"]),
    "no classes": (_set("classes", []), False, ["classes", "at least 2 classes"]),
    "a string for the files": (_set("files", "weights.safetensors"), False, ["files", "valid dictionary"]),
    "no weights recorded": (lambda m: m["files"].pop(WEIGHTS), False, ["files", f"records no {WEIGHTS}"]),
    "an unknown TTA": (_set("training.config.tta", "sideways"), False, ["training.config.tta"]),
    "an unknown CV": (_set("training.calibration.cv", "sideways"), False, ["training.calibration.cv"]),
    "a garbled digest record": (_set(CONTENT_DIGESTS, {"model": "00"}), False, [f"{CONTENT_DIGESTS}.model"]),
    # Bundles of the previous release have no digests: their edits are caught by what they break.
    "older: a class removed": (_drop_class, True, ["classes: 11 classes, but the classifier in weights.safetensors "
                                                   "has 12 outputs"]),
    "older: another model": (_set("model", "resnet18"), True, ["model: weights.safetensors holds no resnet18 network"]),
    "older: an unknown model": (_set("model", "no_such_net"), True, ["model:", "no_such_net"]),
    "older: a class renamed": (lambda m: m["classes"].__setitem__(0, "Actin binders"), True,
                               ["classes: the treatments calibration scores", "no prob_Actin binders column"]),
    "older: 2 channels": (lambda m: m["input"].update(mean=[0.5, 0.5], std=[0.5, 0.5]), True,
                          ["input: 2 channels (mean, std), but preprocessing.channels names 3"]),
    "older: 2 channels everywhere": (lambda m: (m["input"].update(mean=[0.5, 0.5], std=[0.5, 0.5]),
                                                m["preprocessing"].update(channels=["DAPI", "Actin"])), True,
                                     ["input: 2 channels (mean, std), but the first convolution in weights.safetensors "
                                      "takes 3"]),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_every_edit_of_bundle_json_is_one_error_naming_it_and_the_field(case, model, tmp_path):
    edit, previous_release, needles = EDITS[case]
    edited = edited_bundle(model, tmp_path / "edited", edit, previous_release=previous_release)
    with pytest.raises(CellmorphError) as error:
        load_bundle(edited)
    message = str(error.value)
    assert message.startswith(f"{edited / MANIFEST}: ") and "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_a_bundle_json_that_is_no_object_is_one_error(model, tmp_path):
    edited = edited_bundle(model, tmp_path / "edited")
    (edited / MANIFEST).write_text("[1, 2]")
    with pytest.raises(CellmorphError, match="bundle.json: not a JSON object"):
        load_bundle(edited)


def test_predict_with_an_edited_bundle_json_is_one_line_naming_the_field(model, tiny_cache, tmp_path):
    for k, (case, field) in enumerate((("a class removed", "classes"), ("older: a negative input size",
                                                                       "input.input_size"))):
        edit = EDITS[case.removeprefix("older: ")][0]
        edited = edited_bundle(model, tmp_path / f"model{k}", edit, previous_release=case.startswith("older: "))
        out = tmp_path / f"pred{k}"
        one_line_error(run_cli_here("predict", "--model", edited, "--data", tiny_cache, "--out", out),
                       str(edited / MANIFEST), f"{field}:")
        assert not out.exists()


def test_files_outside_the_bundle_are_refused_before_anything_is_opened(model, tmp_path, monkeypatch):
    """A `files` entry is a name in the bundle folder: a path out of it (relative, absolute) or a link
    to a file elsewhere is refused before any file is read, even when its sha256 is the recorded one."""
    from cellmorph import bundle as bundle_module

    secret = tmp_path / "secret.txt"
    secret.write_text("not the bundle's")
    hashed = []
    real_sha256 = bundle_module.sha256_file
    monkeypatch.setattr(bundle_module, "sha256_file", lambda path: hashed.append(path) or real_sha256(path))
    for k, name in enumerate(("../secret.txt", "../../../etc/passwd", str(secret))):
        edited = edited_bundle(model, tmp_path / f"path{k}",
                               lambda m: m["files"].update({name: real_sha256(secret)}), seal=True)
        hashed.clear()
        with pytest.raises(CellmorphError) as error:
            load_bundle(edited)
        assert str(error.value) == (f"{edited / MANIFEST}: files: {name!r} is not the name of a file in the bundle "
                                    "folder (paths are refused)")
        assert hashed == []
    # A link named as a bundle file, to a copy of the very weights outside the folder.
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((model / WEIGHTS).read_bytes())
    linked = edited_bundle(model, tmp_path / "linked")
    (linked / WEIGHTS).unlink()
    (linked / WEIGHTS).symlink_to(outside)
    hashed.clear()
    with pytest.raises(CellmorphError, match=f"{WEIGHTS}: a link to {outside}, outside the model bundle"):
        load_bundle(linked)
    assert hashed == []
    # A link that stays inside the folder is the bundle's own file.
    inside = edited_bundle(model, tmp_path / "inside")
    (inside / "weights.copy").write_bytes((inside / WEIGHTS).read_bytes())
    (inside / WEIGHTS).unlink()
    (inside / WEIGHTS).symlink_to("weights.copy")
    assert load_bundle(inside).classes


def test_predict_with_a_bundle_file_outside_the_bundle_is_one_line(model, tiny_cache, tmp_path):
    edited = edited_bundle(model, tmp_path / "model", lambda m: m["files"].update({"../../../etc/passwd": "0" * 64}),
                           seal=True)
    out = tmp_path / "pred"
    one_line_error(run_cli_here("predict", "--model", edited, "--data", tiny_cache, "--out", out),
                   str(edited / MANIFEST), "files", "../../../etc/passwd", "paths are refused")
    assert not out.exists()


def test_train_refuses_a_moa_holding_the_set_separator_before_any_work(tiny_cache, tmp_path):
    """"a|b" would read as two classes in Prediction_Set (and Set_Size disagree): refused at training,
    naming the cache's index row and compound, before the calibration CV starts."""
    import shutil

    from cellmorph.cache import INDEX_FILE

    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    index = pd.read_parquet(cache / INDEX_FILE)
    moa = index["Metadata_MoA"].astype(object)
    moa[moa == "DNA damage"] = "DNA damage|repair"
    index["Metadata_MoA"] = moa
    index.to_parquet(cache / INDEX_FILE, index=False)
    row = int(np.flatnonzero(moa == "DNA damage|repair")[0])
    out = tmp_path / "model"
    one_line_error(run_cli_here("train", "--data", cache, *QUICK_TRAIN, "--calibration", "group-kfold:2", "--out", out),
                   f"{cache / INDEX_FILE}, row {row} (compound {index['Metadata_Compound'].iloc[row]!r})",
                   "'DNA damage|repair' contains '|'", "MoA table")
    assert not out.exists() and not (tmp_path / "model.cv").exists()
