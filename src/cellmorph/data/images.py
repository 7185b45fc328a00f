"""Reading the pixels of one table row, with errors that name the file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from cellmorph.data.omezarr import is_zarr_array, read_field
from cellmorph.data.patterns import PLANES_PREFIX
from cellmorph.data.table import STACK_COLUMN, ImageTable, channel_column
from cellmorph.errors import BadInputError


def path_columns(table: ImageTable) -> list[str]:
    """The table's file columns: the stack's, or one per channel in ``table.channels`` order."""
    return [STACK_COLUMN] if table.is_stacked else [channel_column(ch) for ch in table.channels]


def row_paths(table: ImageTable, row: pd.Series) -> list[str]:
    return [row[col] for col in path_columns(table)]


def missing_files(table: ImageTable) -> list[tuple[int, str]]:
    """(row position, path) of every referenced file that does not exist."""
    out = []
    for col in path_columns(table):
        for pos, path in enumerate(table.frame[col].to_numpy()):
            if not (Path(path).is_file() or is_zarr_array(path)):
                out.append((pos, str(path)))
    return sorted(out)


def _read_plane(path: str) -> np.ndarray:
    if path.lower().endswith(".npy"):
        try:
            # allow_pickle=False: a crop file must never be able to run code.
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise BadInputError(f"{path}: missing image") from None
        except Exception as exc:
            raise BadInputError(f"{path}: corrupt or unreadable .npy file ({exc})") from None
    if path.lower().endswith((".bmp", ".png")):
        from PIL import Image

        try:
            with Image.open(path) as image:
                return np.asarray(image)
        except FileNotFoundError:
            raise BadInputError(f"{path}: missing image") from None
        except Exception as exc:
            raise BadInputError(f"{path}: corrupt or unreadable image ({exc})") from None
    # tifffile logs (rather than raises) some structural damage; keep stderr to our one line.
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) == 0:
                raise ValueError("no readable image page")
            pixels = tif.asarray()
    except FileNotFoundError:
        raise BadInputError(f"{path}: missing image") from None
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error, ...
        raise BadInputError(f"{path}: corrupt or truncated TIFF ({type(exc).__name__}: {exc})") from None
    if pixels.size == 0:
        raise BadInputError(f"{path}: corrupt or truncated TIFF (no pixel data)")
    return pixels


# prepare computes in float32, whose largest value is about 3.4e38; squares of the DMSO statistics
# overflow long before that. No detector records more than 2**32 levels, so 1e12 leaves room for
# any rescaled or summed image while refusing values that would turn a plate's statistics to inf.
_LARGEST_PIXEL = 1e12


def check_pixel_values(path, pixels: np.ndarray) -> None:
    """Raise naming ``path`` unless ``pixels`` are finite, non-negative real numbers.

    prepare takes 2·sqrt(x + 3/8) of every pixel and z-scores a plate against the mean of its DMSO
    pixels: one NaN, ±inf or negative value would make a whole plate's statistics NaN and every tile
    of the plate blank, so such a file is refused here, where its name is known.
    """
    kind = pixels.dtype.kind
    if kind == "c":
        raise BadInputError(f"{path}: complex pixel type {pixels.dtype}; expected real intensities")
    if kind not in "uif":
        raise BadInputError(f"{path}: pixel type {pixels.dtype} is not numeric")
    if kind == "f":
        bad = ~np.isfinite(pixels)
        if bad.any():
            n_nan = int(np.isnan(pixels).sum())
            what = "NaN" if n_nan == int(bad.sum()) else ("infinite" if n_nan == 0 else "NaN or infinite")
            raise BadInputError(f"{path}: {int(bad.sum())} {what} pixel value(s), the first at {_where(bad)}")
    if kind in "if" and pixels.size and np.abs(pixels).max() > _LARGEST_PIXEL:
        huge = np.abs(pixels) > _LARGEST_PIXEL
        raise BadInputError(f"{path}: {int(huge.sum())} pixel value(s) beyond {_LARGEST_PIXEL:.0e} (largest "
                            f"{pixels.max().item():g}), the first at {_where(huge)}; not an intensity a camera records")
    if kind in "if" and pixels.size and pixels.min() < 0:
        negative = pixels < 0
        raise BadInputError(
            f"{path}: {int(negative.sum())} negative pixel value(s) (lowest {pixels.min().item():g}), the first at "
            f"{_where(negative)}; intensities must be ≥ 0 for the Anscombe transform"
        )


def _where(mask: np.ndarray) -> str:
    """The first True element of ``mask`` as a user finds it in an image viewer or numpy."""
    first = [int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape)]
    return f"row {first[0]}, column {first[1]}" if len(first) == 2 else f"index {first}"


def check_field_shape(path, shape, expected_shape) -> None:
    """Raise naming ``path`` when a field's (H, W) differs from the dataset's."""
    if tuple(shape) != tuple(expected_shape):
        raise BadInputError(
            f"{path}: field shape {shape[0]}×{shape[1]} differs from the dataset's "
            f"{expected_shape[0]}×{expected_shape[1]}"
        )


def read_planes(table: ImageTable, row: pd.Series, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """The C×H×W pixels of one row, in ``table.channels`` order, as stored (e.g. uint16).

    Channel-first because fields are stored one file per channel: stacking the planes along a new
    first axis is a plain copy, and every later per-channel step reads contiguous memory (an H×W×C
    field made the per-channel lookups and extremes of prepare twice as slow). A stacked file stored
    H×W×C comes back as a channel-first view of it.

    Raises :class:`BadInputError` naming the file for a missing, corrupt or
    wrongly shaped image, or one whose pixels are not finite non-negative real numbers
    (:func:`check_pixel_values`). ``expected_shape`` (H, W) enforces one field size.
    """
    n_channels = len(table.channels)
    if table.source == "ome-zarr":  # one Zarr array per field, C×H×W, every channel of the image
        path = row[STACK_COLUMN]
        pixels = read_field(path)
        check_pixel_values(path, pixels)
        if table.stack_positions is not None:
            pixels = pixels[list(table.stack_positions)]
        if pixels.shape[0] != n_channels:
            raise BadInputError(f"{path}: {pixels.shape[0]} channel(s), expected {n_channels} "
                                f"({', '.join(table.channels)})")
    elif table.is_stacked:
        path = row[STACK_COLUMN]
        pixels = _read_plane(path)
        check_pixel_values(path, pixels)
        if pixels.ndim == 3 and pixels.shape[-1] != n_channels and pixels.shape[0] == n_channels:
            pixels = np.moveaxis(pixels, 0, -1)  # TIFF stacks are often stored C×H×W
        if pixels.ndim != 3 or pixels.shape[-1] != n_channels:
            raise BadInputError(
                f"{path}: expected an H×W×{n_channels} image ({', '.join(table.channels)}), got shape {pixels.shape}"
            )
        pixels = np.moveaxis(pixels, -1, 0)
        if table.stack_positions is not None:
            pixels = pixels[list(table.stack_positions)]
    else:
        planes = []
        for ch in table.channels:
            path = row[channel_column(ch)]
            plane = _read_plane(path)
            check_pixel_values(path, plane)
            stack = row.get(PLANES_PREFIX + ch)
            if isinstance(stack, str) and stack:  # a z-stack in one file per plane: its maximum-intensity projection
                for other in stack.split(os.pathsep)[1:]:
                    more = _read_plane(other)
                    check_pixel_values(other, more)
                    if more.shape != plane.shape:
                        raise BadInputError(f"{other}: plane of shape {more.shape}, the field's first plane {path} "
                                            f"has {plane.shape}")
                    plane = np.maximum(plane, more)
            if plane.ndim == 3 and 1 in (plane.shape[0], plane.shape[-1]):
                plane = plane.squeeze()
            if plane.ndim != 2:
                raise BadInputError(f"{path}: expected a single-channel 2-D image for {ch}, got shape {plane.shape}")
            if planes and plane.shape != planes[0].shape:
                raise BadInputError(
                    f"{path}: channel {ch} has shape {plane.shape}, other channels of this field have {planes[0].shape}"
                )
            planes.append(plane)
        pixels = np.stack(planes)
        path = row[channel_column(table.channels[0])]
    if expected_shape is not None:
        check_field_shape(path, pixels.shape[1:], expected_shape)
    return pixels


def write_tiff(path: Path, image: np.ndarray) -> None:
    """A single-channel TIFF, written atomically (temp name beside it, then rename)."""
    from cellmorph.runinfo import atomic_path

    with atomic_path(Path(path), suffix=".tif") as tmp:
        tifffile.imwrite(tmp, image, photometric="minisblack", metadata=None)
