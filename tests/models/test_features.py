"""Feature specs: the head, one timm stage or several, pooled by mean, max or GeM."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from cellmorph.errors import CellmorphError
from cellmorph.models.features import FeatureExtractor, FeatureSpec


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0).eval()
    return model


def test_specs_parse_and_name_themselves():
    assert FeatureSpec.parse("head").is_head and FeatureSpec().describe() == "head"
    spec = FeatureSpec.parse("stage3+stage4/mean+max")
    assert spec.layers == (3, 4) and spec.pool == ("mean", "max")
    assert spec.describe() == "stage3+stage4/mean+max"
    assert FeatureSpec.model_validate(spec.describe()) == spec  # the name is the spec
    assert FeatureSpec.model_validate(spec.model_dump(mode="json")) == spec  # and YAML round-trips
    assert FeatureSpec.parse("stage3").pool == ("mean",)
    for bad, needle in (("layer3", "expected head"), ("stage3/avg", "pool"), ("stage3+stage3", "distinct")):
        with pytest.raises(CellmorphError, match=needle):
            FeatureSpec.parse(bad)


def test_stage_features_are_the_pooled_timm_stage_outputs(lite0):
    """stage3+stage4 / mean+max is the concatenation, in that order, of each stage's spatial mean and max,
    where the stages are timm's own feature_info stages (features_only counts them the same way)."""
    x = torch.rand(2, 3, 96, 96)
    extractor = FeatureExtractor(lite0, FeatureSpec.parse("stage4+stage3/mean+max"))
    with torch.inference_mode():
        got = extractor(x)
        only = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(3, 4))
        only.load_state_dict({k: v for k, v in lite0.state_dict().items() if not k.startswith(("conv_head", "bn2"))},
                             strict=False)
        stage3, stage4 = only.eval()(x)
    assert stage3.shape[1] == 112 and stage4.shape[1] == 320
    expected = torch.cat([stage4.mean((2, 3)), stage4.amax((2, 3)), stage3.mean((2, 3)), stage3.amax((2, 3))], 1)
    assert got.shape == (2, 864) and extractor.dim == 864
    torch.testing.assert_close(got, expected)
    with torch.inference_mode():
        gem = FeatureExtractor(lite0, FeatureSpec.parse("stage3/gem"))(x)
    # GeM (p = 3) of the positive part lies between its mean and its max
    positive = stage3.clamp(min=1e-6)
    assert (gem >= positive.mean((2, 3)) - 1e-5).all() and (gem <= positive.amax((2, 3)) + 1e-5).all()
    assert not torch.allclose(gem, positive.mean((2, 3)))


def test_the_head_is_the_backbone_output_and_missing_stages_are_one_line(lite0):
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(FeatureExtractor(lite0, FeatureSpec())(x), lite0(x))
    with pytest.raises(CellmorphError, match="stages 0–4"):
        FeatureExtractor(lite0, FeatureSpec.parse("stage5"), "tf_efficientnet_lite0")


def test_embed_records_and_writes_stage_features(tiny_cache, tmp_path):
    import json

    import pandas as pd

    from cellmorph.embed import EmbedConfig, embed

    summary = embed(tiny_cache, tmp_path / "e", EmbedConfig(image_size=64, features=FeatureSpec.parse("stage3/mean+gem")),
                    progress=False)
    assert summary["dim"] == 224 and summary["features"]["name"] == "stage3/mean+gem"
    assert json.loads((tmp_path / "e" / "embed.json").read_text())["features"]["layers"] == [3]
    tiles = pd.read_parquet(tmp_path / "e" / "tiles.parquet")
    values = tiles[[f"emb_{i}" for i in range(224)]].to_numpy()
    assert np.isfinite(values).all() and values.std(axis=0).mean() > 0


def test_embed_defaults_crops_to_stage3_and_4_dihedral_and_128_px(real_crops, tmp_path):
    """The evidence-backed crop defaults (issue 19): stages 3+4 mean-pooled, dihedral TTA, 128 px."""
    import json

    from cellmorph.data.crops import load_crop_table
    from cellmorph.embed import embed
    from cellmorph.preprocess import PrepareConfig, prepare

    index = pd.read_csv(real_crops).head(40)
    index["FileName"] = [str(real_crops.parent / name) for name in index["FileName"]]
    index.to_csv(tmp_path / "few.csv", index=False)
    prepare(load_crop_table(tmp_path / "few.csv"), tmp_path / "cache", PrepareConfig(tile_grid=(1, 1),
            normalize="none"), progress=False)
    seen = {}
    import cellmorph.models.features as module

    original = module.FeatureExtractor.forward

    def spy(self, x):
        seen["size"] = tuple(x.shape[-2:])
        return original(self, x)

    module.FeatureExtractor.forward = spy
    try:
        summary = embed(tmp_path / "cache", tmp_path / "e", progress=False)
    finally:
        module.FeatureExtractor.forward = original
    # Crops: stages 3 and 4 (112 + 320 channels for Lite0), averaged over the dihedral views.
    assert summary["features"]["name"] == "stage3+stage4/mean" and summary["dim"] == 112 + 320
    assert summary["tta"] == "dihedral"
    assert seen["size"] == (128, 128)
    assert json.loads((tmp_path / "e" / "embed.json").read_text())["features"]["layers"] == [3, 4]
