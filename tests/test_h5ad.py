"""AnnData companions: read back by anndata, used by scanpy, provenance kept."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.conftest import run_cli_here

anndata = pytest.importorskip("anndata")

from cellmorph.h5ad import read_provenance, to_anndata, write_h5ad  # noqa: E402


def test_a_profile_table_becomes_obs_x_and_uns(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "Metadata_Plate": ["P1"] * 4 + ["P2"] * 4, "Metadata_Well": ["B02", "B03", "B04", "B05"] * 2,
        "Metadata_Compound": ["DMSO", "taxol", "taxol", "AZ138"] * 2, "Metadata_Concentration": [0, 0.3, 1.0, 3.0] * 2,
        "Metadata_MoA": ["DMSO", "Microtubule stabilizers", "Microtubule stabilizers", "Eg5 inhibitors"] * 2,
        "Prediction_Set": [["DMSO"], ["A", "B"], ["A"], []] * 2, "Novel": [False, True, False, False] * 2,
        **{f"emb_{k}": rng.normal(size=8).astype(np.float32) for k in range(5)},
    })
    path = write_h5ad(frame, tmp_path / "wells.h5ad", {"config": {"model": "tf_efficientnet_lite0", "weights": None},
                                                        "provenance": {"git_commit": "abc"}})
    adata = anndata.read_h5ad(path)
    assert adata.shape == (8, 5) and list(adata.var_names) == [f"emb_{k}" for k in range(5)]
    np.testing.assert_array_equal(adata.X, frame[[f"emb_{k}" for k in range(5)]].to_numpy(np.float32))
    assert list(adata.obs_names) == [f"{p}_{w}" for p, w in zip(frame["Metadata_Plate"], frame["Metadata_Well"])]
    assert adata.obs["Metadata_MoA"].tolist() == frame["Metadata_MoA"].tolist()
    assert adata.obs["Prediction_Set"].tolist()[:2] == ["DMSO", "A;B"] and adata.obs["Novel"].dtype == bool
    assert read_provenance(adata) == {"config": {"model": "tf_efficientnet_lite0", "weights": None},
                                      "provenance": {"git_commit": "abc"}}
    assert not list(tmp_path.glob(".*"))  # written under a temporary name, then renamed


def test_a_table_without_features_is_refused():
    from cellmorph.errors import CellmorphError

    with pytest.raises(CellmorphError, match="no feature"):
        to_anndata(pd.DataFrame({"Metadata_Plate": ["P1"], "Metadata_Well": ["B02"]}))


@pytest.mark.slow
def test_predict_writes_h5ad_that_scanpy_uses(tiny_bundle, tiny_cache, tmp_path):
    sc = pytest.importorskip("scanpy")
    proc = run_cli_here("predict", "--model", tiny_bundle, "--data", tiny_cache, "--h5ad", "--out", tmp_path / "pred",
                        "--no-progress")
    assert proc.returncode == 0, proc.stderr
    for level in ("wells", "treatments"):
        table = pd.read_parquet(tmp_path / "pred" / f"{level}.parquet")
        adata = anndata.read_h5ad(tmp_path / "pred" / f"{level}.h5ad")
        probs = [c for c in table.columns if c.startswith("prob_")]
        assert list(adata.var_names) == probs and adata.n_obs == len(table)
        np.testing.assert_allclose(adata.X, table[probs].to_numpy(np.float32))
        assert adata.obs["Metadata_Compound"].astype(str).tolist() == table["Metadata_Compound"].astype(str).tolist()
        record = read_provenance(adata)
        assert record["config"]["h5ad"] is True and "git_commit" in record["provenance"]
    sc.pp.pca(adata, n_comps=3)  # the treatments: a scanpy step runs on the file as written
    assert adata.obsm["X_pca"].shape == (adata.n_obs, 3)
    means = sc.get.aggregate(adata, by="Metadata_MoA", func="mean")
    assert set(means.obs_names) == set(table["Metadata_MoA"].astype(str))


def test_embed_writes_well_and_treatment_profiles_as_h5ad(tiny_cache, tmp_path):
    import json

    from cellmorph.config.embed import EmbedConfig
    from cellmorph.embed import embed

    embed(tiny_cache, tmp_path / "e", EmbedConfig(image_size=32, h5ad=True, threads=1), progress=False, log=lambda m: None)
    record = json.loads((tmp_path / "e" / "embed.json").read_text())
    assert record["config"]["standardize"] == "plate"  # a field layout's default; crop tables pool each batch's DMSO
    for name in ("wells", "wells_normalized"):
        table = pd.read_parquet(tmp_path / "e" / f"{name}.parquet")
        adata = anndata.read_h5ad(tmp_path / "e" / f"{name}.h5ad")
        features = [c for c in table.columns if c.startswith("emb_")]
        assert list(adata.var_names) == features and adata.n_obs == len(table)
        np.testing.assert_allclose(adata.X, table[features].to_numpy(np.float32), equal_nan=True)
        assert read_provenance(adata)["config"]["h5ad"] is True
    treatments = anndata.read_h5ad(tmp_path / "e" / "treatments.h5ad")
    assert treatments.n_obs == 44 and "DMSO" not in set(treatments.obs["Metadata_Compound"].astype(str))
    assert treatments.obs["n_wells"].min() >= 1
