"""``open_region_features(path)``: pick the region-feature reader from what ``path`` is."""

from __future__ import annotations

import os
from pathlib import Path

from vl.data.features.region_hdf5 import HDF5RegionReader
from vl.data.features.region_json import FrcnnJsonRegionReader
from vl.data.features.region_lmdb import RegionFeatureReader
from vl.errors import DataError

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

RegionReader = RegionFeatureReader | HDF5RegionReader | FrcnnJsonRegionReader


def open_region_features(path: str | Path) -> RegionReader:
    """Open region features in whichever supported format ``path`` is. All readers give the same ``reader[id]`` dict.

    - a directory holding ``data.mdb``, a ``*.lmdb`` directory, or a ``.lmdb``/``.mdb`` file -> ``RegionFeatureReader``
    - ``.h5`` / ``.hdf5`` / ``.hdf`` file (or any file with the HDF5 signature) -> ``HDF5RegionReader``
    - a directory of ``.json`` files, or a ``.json`` / ``.jsonl`` file -> ``FrcnnJsonRegionReader``
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: region features not found")
    suffix = p.suffix.lower()
    if p.is_dir():
        if (p / "data.mdb").is_file() or suffix == ".lmdb":
            return RegionFeatureReader(p)
        if any(e.name.endswith(".json") for e in os.scandir(p)):
            return FrcnnJsonRegionReader(p)
        raise DataError(f"{p}: directory is neither an LMDB (no data.mdb) nor a directory of per-image .json files")
    if suffix in (".lmdb", ".mdb"):
        return RegionFeatureReader(p)
    if suffix in (".h5", ".hdf5", ".hdf"):
        return HDF5RegionReader(p)
    if suffix in (".json", ".jsonl"):
        return FrcnnJsonRegionReader(p)
    if suffix in (".tsv", ".csv"):
        raise DataError(
            f"{p}: a bottom-up-attention TSV is not read directly; convert it first with "
            f"`python -m vl.tools.convert_features tsv2lmdb {p} OUT.lmdb`"
        )
    try:
        with open(p, "rb") as f:
            magic = f.read(8)
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror})") from None
    if magic == _HDF5_SIGNATURE:
        return HDF5RegionReader(p)
    raise DataError(
        f"{p}: cannot tell the region-feature format (expected an LMDB directory, .h5/.hdf5, or FRCNN .json/.jsonl)"
    )
