"""load_table and prepare_config: what `cellmorph inspect` and `cellmorph prepare` run, without the CLI."""

from __future__ import annotations

import pytest
import yaml

from cellmorph.data.bbbc014 import bbbc014_prepare_config
from cellmorph.data.layouts import LAYOUTS, load_table, prepare_config
from cellmorph.errors import BadInputError, CellmorphError


def test_load_table_dispatches_on_the_layout(tiny_screen, real_crops, tmp_path):
    table = load_table("bbbc021", root=tiny_screen)
    assert table.source == "bbbc021" and table.origin == str(tiny_screen / "BBBC021_v1_image.csv")
    crops = load_table("crops", index=real_crops, channels="DNA, Tub, Act")
    assert crops.channels == ("DNA", "Tub", "Act") and crops.origin == str(real_crops)


@pytest.mark.parametrize(
    "layout, message",
    [
        ("bbbc021", "^layout bbbc021 needs root DIR"),
        ("bbbc014", "^layout bbbc014 needs root DIR"),
        ("crops", "^layout crops needs index CSV"),
        ("generic", "^layout generic needs layout_config YAML"),
        ("cellpainting", "unknown layout 'cellpainting'; valid layouts: " + ", ".join(LAYOUTS)),
    ],
)
def test_load_table_says_what_a_layout_needs(layout, message):
    """In the library's terms (its arguments); the command line says --root, --index (tests/test_errors.py)."""
    with pytest.raises(CellmorphError, match=message):
        load_table(layout)


def test_prepare_config_layout_defaults():
    assert prepare_config("bbbc021").tile_grid == (2, 2)
    assert prepare_config("generic").tile_grid == (2, 2)
    assert prepare_config("crops").tile_grid == (1, 1)
    assert prepare_config("bbbc014") == bbbc014_prepare_config()
    # crops are not stretched one by one (issue 19); --paper restores the per-field map anywhere
    assert prepare_config("crops").scaling == "fixed" and prepare_config("bbbc021").scaling == "image"
    assert prepare_config("crops", paper=True).scaling == "image"
    assert prepare_config("crops", paper=True).tile_grid == (1, 1)
    assert prepare_config("bbbc021", paper=True) == prepare_config("bbbc021")
    assert prepare_config("bbbc014", paper=True) == bbbc014_prepare_config()


def test_prepare_config_file_then_given_values(tmp_path):
    path = tmp_path / "prepare.yaml"
    path.write_text(yaml.safe_dump({"normalize": "batch", "tile_size": 96, "skip_bad": True}))
    cfg = prepare_config("crops", path, tile_size=64, scaling=None, skip_bad=None)
    assert (cfg.normalize, cfg.tile_size, cfg.scaling, cfg.skip_bad, cfg.tile_grid) == ("batch", 64, "fixed", True, (1, 1))
    # A given value overrides the layout default, and None never overrides.
    assert prepare_config("bbbc014", tile_size=None, tile_grid=(2, 2)).tile_grid == (2, 2)
    assert prepare_config("bbbc014", tile_size=None).tile_size == 256


def test_prepare_config_errors_name_their_source(tmp_path):
    path = tmp_path / "prepare.yaml"
    path.write_text("normalise: plate\n")
    with pytest.raises(CellmorphError, match=f"{path}: normalise: Extra inputs are not permitted"):
        prepare_config("bbbc021", path)
    # A value given as an option is named as the option; one from the YAML file by file and field.
    with pytest.raises(CellmorphError, match="^--tile-size big: Input should be a valid integer"):
        prepare_config("bbbc021", tile_size="big")
    path.write_text("tile_size: 0\n")
    with pytest.raises(CellmorphError, match=f"^{path}: tile_size: Input should be greater than or equal to 1"):
        prepare_config("bbbc021", path)
    with pytest.raises(CellmorphError, match="is a directory, expected a YAML file"):
        prepare_config("bbbc021", tmp_path)


def test_header_only_csv_names_the_file(tmp_path):
    csv = tmp_path / "index.csv"
    csv.write_text("FileName,Metadata_Plate,Metadata_Well,Metadata_Site,Metadata_Compound,Metadata_Concentration,"
                   "Metadata_MoA\n")
    with pytest.raises(BadInputError, match=f"{csv}: no rows below the header"):
        load_table("crops", index=csv)
