"""Copies of a trained bundle with an edited bundle.json, as a user (or an attacker) would make them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from cellmorph.bundle import CONTENT_DIGESTS, MANIFEST, content_digests, sha256_file


def edited_bundle(model: Path, dest: Path, edit: Callable[[dict], object] | None = None, *,
                  seal: bool = False, previous_release: bool = False) -> Path:
    """A copy of the bundle ``model`` at ``dest`` whose bundle.json ``edit`` changed in place.

    ``seal``: record the sha256 of the files and entries again afterwards (:func:`seal`), so that
    only the checks of what the document says can refuse it. ``previous_release``: written as
    releases before ``content_sha256`` wrote it (no digests; Python's bare NaN for a missing number).
    """
    shutil.copytree(model, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    if previous_release:
        del manifest[CONTENT_DIGESTS]
        manifest["training"]["history"][-1]["heldout_tile_accuracy"] = float("nan")
    if edit is not None:
        edit(manifest)
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return seal_bundle(dest) if seal else dest


def seal_bundle(bundle: Path) -> Path:
    """Record the sha256 of ``bundle``'s files (those in its folder; other entries stay as they
    are) and, unless it has none, of its bundle.json entries again: the bundle as if written so."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"] = {name: sha256_file(bundle / name) if (bundle / name).parent == bundle
                         and (bundle / name).is_file() else digest for name, digest in manifest["files"].items()}
    if CONTENT_DIGESTS in manifest:
        manifest[CONTENT_DIGESTS] = content_digests(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return bundle
