"""Precomputed image-feature readers and writers, one module per format.

- Region features, ViLBERT LMDB layout (``RegionFeatureReader`` / ``write_region_lmdb``; ``region_lmdb``).
- Region features, one HDF5 file (``HDF5RegionReader`` / ``write_region_hdf5``; ``region_hdf5``).
- Region features, MM-BERT / bottom-up-attention per-image Faster R-CNN JSON with base64 arrays, as a directory of
  ``<image_id>.json`` or a JSONL file (``FrcnnJsonRegionReader`` / ``write_region_json``; ``region_json``).
- ``open_region_features(path)`` picks the region reader from what ``path`` is (``factory``); all three return the same
  dict. ``python -m vl.tools.convert_features`` converts TSV / LMDB / HDF5 / JSON (see ``vl.data.features.convert``).
- CLIP global embeddings, HDF5 (``ClipFeatureReader`` / ``write_clip_hdf5``; ``clip_hdf5``).
- What they share (array encoding, atomic replacement, the reader output dict, lazy handles) is in ``base``.

Readers open their file lazily, once per process (the handle is dropped when pickled and reopened when the pid changes),
so they can be handed to DataLoader workers and DDP processes. Every failure raises ``vl.errors.DataError`` naming the
file (and the image id / field).
"""

from __future__ import annotations

from vl.data.features.base import decode_array as _decode_array  # noqa: F401 - imported by vl.data.features.convert
from vl.data.features.base import encode_array
from vl.data.features.clip_hdf5 import ClipFeatureReader, write_clip_hdf5
from vl.data.features.factory import RegionReader, open_region_features
from vl.data.features.region_hdf5 import HDF5_FORMAT as HDF5_FORMAT
from vl.data.features.region_hdf5 import HDF5_VERSION as HDF5_VERSION
from vl.data.features.region_hdf5 import HDF5RegionReader, write_region_hdf5
from vl.data.features.region_json import FrcnnJsonRegionReader, write_region_json
from vl.data.features.region_lmdb import KEYS_KEY as KEYS_KEY
from vl.data.features.region_lmdb import RegionFeatureReader, write_region_lmdb

__all__ = [
    "RegionFeatureReader",
    "HDF5RegionReader",
    "FrcnnJsonRegionReader",
    "RegionReader",
    "open_region_features",
    "ClipFeatureReader",
    "write_region_lmdb",
    "write_region_hdf5",
    "write_region_json",
    "write_clip_hdf5",
    "encode_array",
]
