"""CVConfig: rules between fields are checked when a config is made, from YAML as from options."""

from __future__ import annotations

import pytest

from cellmorph.cv import CVConfig, load_cv_config
from cellmorph.cv.config import field_help
from cellmorph.errors import CellmorphError


@pytest.mark.parametrize("yaml_text, message", [
    ("init: xavier\nfreeze_stages: 2\n", "random: use freeze_stages 0 with xavier"),
    ("mode: linear-probe\ntta: rotate\n", "tta"),
    ("frozen_feature_cache: true\n", "frozen_feature_cache needs mode finetune with freeze_stages > 0"),
    ("epochs: 3\neval_epochs: [1, 5]\n", r"eval_epochs \[5\] exceed epochs=3"),
    ("eval_epochs: [11]\n", r"eval_epochs \[11\] exceed epochs=10"),  # the default 10 epochs
    ("keep_checkpoints: some\n", "keep_checkpoints"),
    ("features: stage3\n", "features stage3/mean apply to mode linear-probe"),
    ("mode: linear\nbackbone_lr_scale: 0.1\n", "mode finetune only"),
    ("mode: linear-probe\nunfreeze_every: 1\n", "mode finetune only"),
    ("mode: linear-probe\nhead_init: probe\n", "linear-probe is the probe itself"),
    ("head_init: lp\n", "head_init"),
    ("mode: linear-probe\nfeatures: stage3/avg\n", "features"),
])
def test_a_config_file_that_cannot_run_fails_when_loaded(yaml_text, message, tmp_path):
    path = tmp_path / "cv.yaml"
    path.write_text(yaml_text)
    with pytest.raises(CellmorphError, match=message) as caught:
        CVConfig.from_yaml(path)
    assert str(caught.value).startswith(f"{path}: ") and "Value error" not in str(caught.value)


def test_options_are_checked_by_the_same_rules_and_override_the_file(tmp_path):
    path = tmp_path / "cv.yaml"
    path.write_text("model: resnet18\nfreeze_stages: 2\n")
    assert load_cv_config(path).freeze_stages == 2
    with pytest.raises(CellmorphError, match="freeze_stages 0 with xavier"):
        load_cv_config(path, init="xavier")
    with pytest.raises(CellmorphError, match="^cv options: "):
        load_cv_config(None, mode="linear-probe", head_init="probe")
    # model_copy skips pydantic's validators; validate_config checks a CVConfig again.
    from cellmorph.cv import validate_config

    with pytest.raises(CellmorphError, match="freeze_stages 0 with xavier"):
        validate_config(CVConfig(freeze_stages=2).model_copy(update={"init": "xavier"}))


def test_option_help_is_the_field_description():
    assert field_help("keep_checkpoints").startswith("fold weights to keep")
    assert "cell-line" in field_help("cv") and "batch" in field_help("cv")


def test_features_load_from_their_name_or_a_mapping_and_stay_out_of_default_fingerprints(tmp_path):
    from cellmorph.cv.rundir import compute_fields
    from cellmorph.models.features import FeatureSpec

    path = tmp_path / "cv.yaml"
    path.write_text("mode: linear-probe\nfeatures: {layers: [3, 4], pool: [mean, max]}\n")
    assert CVConfig.from_yaml(path).features == FeatureSpec.parse("stage3+stage4/mean+max")
    assert load_cv_config(None, mode="linear-probe", features="stage3").features.layers == (3,)
    # the default (head) leaves fingerprints of runs made before the option existed unchanged
    assert "features" not in compute_fields(CVConfig(mode="linear-probe"), ())
    assert compute_fields(CVConfig(mode="linear-probe", features="stage3"), ())["features"]["layers"] == [3]
