"""One error message, two readers: the library names a setting by its field, the command line by its flag."""

from __future__ import annotations

import pytest

from cellmorph.errors import CellmorphError, option
from tests.conftest import one_line_error, run_cli_here


def test_a_setting_reads_as_its_field_in_the_library_and_as_its_flag_on_the_command_line():
    error = CellmorphError(f"{option('num_threads')} 0: give {option('image_size')} 128 or\n  {option('out')} X")
    assert str(error) == "num_threads 0: give image_size 128 or out X"
    assert error.command_line_text({"num_threads": "--threads"}) == "--threads 0: give --image-size 128 or --out X"
    assert "\0" not in str(error) and "\0" not in error.command_line_text()


def test_library_calls_name_arguments_and_the_command_line_names_flags(tiny_cache, tmp_path):
    from cellmorph.data.layouts import load_table
    from cellmorph.runtime import resolve_device, resolve_threads

    with pytest.raises(CellmorphError, match=r"^layout crops needs index CSV$"):
        load_table("crops")
    with pytest.raises(CellmorphError, match=r"^num_threads must be"):
        resolve_threads(0)
    with pytest.raises(CellmorphError, match=r"^device 'bogus'"):
        resolve_device("bogus")
    one_line_error(run_cli_here("prepare", "--layout", "crops", "--out", tmp_path / "c"), "--layout crops needs --index CSV")
    one_line_error(run_cli_here("cv", "--data", tiny_cache, "--device", "bogus", "--out", tmp_path / "r"),
                   "--device 'bogus'")
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()
