"""The embedded scene corpus on disk: the scenes of ``vl.data.scenes.generator`` written in the real formats, checked, cached.

``write_corpus`` writes (paths relative to the corpus root)::

    images/<image_id>.png                                   RGB PNG, image_size x image_size
    annotations/captions_{train,val,test}.json              COCO captions {"info","images","annotations"}
    vlp/{train,val,test}.jsonl                              {"text": caption, "image_id": "<image_id>"}
    lxmert/mscoco_{train,val,test}.json                     LXMERT pretraining JSON (captions + VQA questions)
    lxmert_text/{train,val,test}.jsonl                      {"text"}: that JSON as an MLM text corpus
    clip_features.hdf5                                      features float32 (N, clip_dim); ids S{maxlen} (N,)
    regions.lmdb/data.mdb                                   ViLBERT region-feature LMDB (see vl.data.features)
    regions.hdf5                                            the same region features, vl HDF5 layout
    regions_json/<image_id>.json                            the same, per-image FRCNN JSON (base64, MM-BERT)
    vqa/v2_OpenEnded_mscoco_{split}2014_questions.json      official VQA questions
    vqa/v2_mscoco_{split}2014_annotations.json              official VQA annotations (10 answers each)
    vqa/cache/{split}_target.pkl / .json                    [{question_id, image_id, labels, scores}]
    vqa/cache/trainval_ans2label.pkl / trainval_label2ans.pkl
    vqa/trainval_ans2label.json / trainval_label2ans.json
    retrieval/{train,val,test}.jsonl, hard_negative.pkl     Flickr30k retrieval layout (vl.data.formats.retrieval)
    vcr/{split}.jsonl, vcr1images/, names table, regions.lmdb   VCR layout (vl.data.formats.vcr)
    refcoco+/refs(unc).p, instances.json, dets.lmdb, gt.lmdb   RefCOCO+ REFER layout (vl.data.formats.refcoco)
    manifest.json                                           written last: settings, version, files with sizes/sha1s

``ensure_corpus(cache_dir, settings, parts)`` keeps one validated copy per (settings, GENERATOR_VERSION) in
``cache_dir/scenes-<key>`` (``verify_corpus`` decides whether it can be reused). The shared scene data (images,
captions, features, VQA, LXMERT) is the core; the task corpora (``PARTS``: retrieval, VCR, RefCOCO+) are written
when a data module first asks for them (its ``corpus_parts``), each with its own manifest ``parts/<name>.json``
written last, under the same lock: a VQA run never pays for VCR's files. ``write_corpus`` (and ``python -m
vl.tools.scenes --out DIR``) writes everything unless given ``parts``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vl.data.features import (
    ClipFeatureReader,
    FrcnnJsonRegionReader,
    HDF5RegionReader,
    RegionFeatureReader,
)
from vl.data.formats.jsonl import write_atomically
from vl.data.scenes.generator import (
    GENERATOR_VERSION,
    NUM_REGION_CLASSES,
    SPLITS,
    Scene,
    SceneSettings,
    answer_vocab,
    generate_scenes,
)
from vl.data.scenes.writers.core import (
    write_captions,
    write_features,
    write_images,
    write_json,
    write_lxmert,
    write_vqa,
)
from vl.data.scenes.writers.refcoco import write_refcoco_corpus
from vl.data.scenes.writers.retrieval import write_retrieval_corpus
from vl.data.scenes.writers.vcr import write_vcr_corpus
from vl.errors import DataError
from vl.progress import progress

log = logging.getLogger(__name__)

__all__ = [
    "PARTS",
    "corpus_key",
    "corpus_paths",
    "write_corpus",
    "verify_corpus",
    "verify_part",
    "ensure_corpus",
    "default_cache_dir",
]

#: task corpora written on first use: name -> (its directory under the root, writer(root, scenes, settings) -> paths)
PARTS: dict[str, tuple[str, Any]] = {
    "retrieval": ("retrieval", write_retrieval_corpus),
    "vcr": ("vcr", write_vcr_corpus),
    "refcoco": ("refcoco+", write_refcoco_corpus),
}

# ----------------------------------------------------------------------------------------------------------- writing


def corpus_key(settings: SceneSettings) -> str:
    """Short hash of the settings and GENERATOR_VERSION (names the cache directory)."""
    blob = json.dumps({"settings": settings.to_dict(), "version": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def corpus_paths(root: str | Path) -> dict[str, Path]:
    """Canonical paths inside a corpus root. Keys: ``images``, ``clip``, ``regions`` (LMDB), ``regions_hdf5``,
    ``regions_json`` (directory), ``manifest``, ``ans2label``,
    ``label2ans`` (JSON), ``ans2label_pkl``, ``label2ans_pkl``, and per split s: ``captions_s``, ``vlp_s``,
    ``vqa_questions_s``, ``vqa_annotations_s``, ``vqa_targets_s`` (pkl), ``vqa_targets_json_s``, ``lxmert_s`` (LXMERT
    pretraining JSON), ``lxmert_text_s`` (its MLM text JSONL)."""
    root = Path(root)
    paths = {
        "images": root / "images",
        "clip": root / "clip_features.hdf5",
        "regions": root / "regions.lmdb",
        "regions_hdf5": root / "regions.hdf5",
        "regions_json": root / "regions_json",
        "manifest": root / "manifest.json",
        "ans2label": root / "vqa" / "trainval_ans2label.json",
        "label2ans": root / "vqa" / "trainval_label2ans.json",
        "ans2label_pkl": root / "vqa" / "cache" / "trainval_ans2label.pkl",
        "label2ans_pkl": root / "vqa" / "cache" / "trainval_label2ans.pkl",
    }
    for s in SPLITS:
        paths[f"captions_{s}"] = root / "annotations" / f"captions_{s}.json"
        paths[f"vlp_{s}"] = root / "vlp" / f"{s}.jsonl"
        paths[f"cc_{s}"] = root / "cc" / f"{s}.tsv"
        paths[f"lxmert_{s}"] = root / "lxmert" / f"mscoco_{s}.json"
        paths[f"lxmert_text_{s}"] = root / "lxmert_text" / f"{s}.jsonl"
        paths[f"vqa_questions_{s}"] = root / "vqa" / f"v2_OpenEnded_mscoco_{s}2014_questions.json"
        paths[f"vqa_annotations_{s}"] = root / "vqa" / f"v2_mscoco_{s}2014_annotations.json"
        paths[f"vqa_targets_{s}"] = root / "vqa" / "cache" / f"{s}_target.pkl"
        paths[f"vqa_targets_json_{s}"] = root / "vqa" / "cache" / f"{s}_target.json"
    return paths


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


_CHECKSUM_SUFFIXES = (".json", ".jsonl", ".pkl")
_CHECKSUM_MAX_BYTES = 8 * 1024 * 1024
#: the feature stores (LMDB data files, HDF5) get a `sampled_sha1`: the whole file up to `_SAMPLE_FULL_BYTES`, else
#: `_SAMPLE_BLOCKS` blocks of `_SAMPLE_BLOCK` bytes spread evenly from the first to the last byte (a cheap verify that
#: catches same-size damage, e.g. zeroed pages, which the size check cannot see)
_SAMPLED_SUFFIXES = (".mdb", ".hdf5", ".h5")
_SAMPLE_FULL_BYTES = 16 * 1024 * 1024
_SAMPLE_BLOCKS = 64
_SAMPLE_BLOCK = 64 * 1024


def _sampled_sha1(path: Path) -> str:
    size = path.stat().st_size
    if size <= max(_SAMPLE_FULL_BYTES, _SAMPLE_BLOCKS * _SAMPLE_BLOCK):
        return _sha1(path)
    h = hashlib.sha1(str(size).encode())
    last = size - _SAMPLE_BLOCK
    with path.open("rb") as f:
        for i in range(_SAMPLE_BLOCKS):
            f.seek(last * i // (_SAMPLE_BLOCKS - 1))
            h.update(f.read(_SAMPLE_BLOCK))
    return h.hexdigest()


def _wants_sampled_hash(rel: str) -> bool:
    return rel.endswith(_SAMPLED_SUFFIXES) and not rel.endswith("lock.mdb")


def write_corpus(root: str | Path, settings: SceneSettings | None = None, parts: Sequence[str] | None = None) -> Path:
    """Generate the corpus and write the core formats into ``root`` (created), ``manifest.json`` last, then the task
    ``parts`` (default: all of ``PARTS``). Returns ``root``."""
    settings = settings or SceneSettings()
    parts = list(PARTS) if parts is None else list(parts)
    _check_parts(parts)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = corpus_paths(root)
    if paths["manifest"].exists():
        paths["manifest"].unlink()  # an old manifest must never vouch for new files
    scenes = generate_scenes(settings)
    by_split = {s: [sc for sc in scenes if sc.split == s] for s in SPLITS}
    info = {
        "description": "vl procedural scene corpus",
        "version": GENERATOR_VERSION,
        "seed": settings.seed,
        "contributor": "vl",
    }
    label2ans = answer_vocab(settings)
    written = write_images(paths, scenes)
    written += write_captions(paths, by_split, info)
    written += write_features(paths, scenes, settings)
    written += write_vqa(paths, by_split, info, label2ans)
    written += write_lxmert(paths, by_split)
    _write_manifest(root, paths, written, settings, scenes, by_split, len(label2ans))
    for part in parts:
        write_part(root, part, scenes, settings)
    return root


def _check_parts(parts: Sequence[str]) -> None:
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown corpus part(s) {unknown}; known: {sorted(PARTS)}")


def _part_manifest(root: Path, part: str) -> Path:
    return root / "parts" / f"{part}.json"


def write_part(root: str | Path, part: str, scenes: Sequence[Scene], settings: SceneSettings) -> None:
    """(Re)write task corpus ``part`` of the corpus at ``root``: its directory is removed first, its manifest
    (``parts/<part>.json``: settings, version, files) written last and atomically."""
    root = Path(root)
    directory, writer = PARTS[part]
    manifest = _part_manifest(root, part)
    manifest.unlink(missing_ok=True)  # an old manifest must never vouch for new files
    shutil.rmtree(root / directory, ignore_errors=True)
    written = writer(root, scenes, settings)
    record = {
        "generator_version": GENERATOR_VERSION,
        "key": corpus_key(settings),
        "settings": settings.to_dict(),
        "files": _file_entries(root, written),
    }
    write_atomically(manifest, lambda tmp: write_json(tmp, record))


def _file_entries(root: Path, written: Sequence[Path], unhashed_dir: Path | None = None) -> list[dict[str, Any]]:
    """Manifest entries: path and size; sha1 of small text / pickle files (not those in ``unhashed_dir``), a
    sampled sha1 of the feature stores."""
    files = []
    for p in written:
        entry: dict[str, Any] = {"path": p.relative_to(root).as_posix(), "size": p.stat().st_size}
        if p.suffix in _CHECKSUM_SUFFIXES and entry["size"] <= _CHECKSUM_MAX_BYTES and p.parent != unhashed_dir:
            entry["sha1"] = _sha1(p)
        elif _wants_sampled_hash(entry["path"]):
            entry["sampled_sha1"] = _sampled_sha1(p)
        files.append(entry)
    return files


def _write_manifest(
    root: Path,
    paths: dict[str, Path],
    written: list[Path],
    settings: SceneSettings,
    scenes: Sequence[Scene],
    by_split: dict[str, list[Scene]],
    num_answers: int,
) -> None:
    """``manifest.json`` (atomically): settings, version, counts and every written file with its size (and sha1 for
    the small text / pickle files, except the per-image region JSON)."""
    files = _file_entries(root, written, unhashed_dir=paths["regions_json"])
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "key": corpus_key(settings),
        "settings": settings.to_dict(),
        "counts": {
            "images": len(scenes),
            **{f"images_{s}": len(by_split[s]) for s in SPLITS},
            "captions": sum(len(sc.captions) for sc in scenes),
            "questions": sum(len(sc.questions) for sc in scenes),
            "answers": num_answers,
            "region_classes": NUM_REGION_CLASSES,
        },
        "files": files,
    }
    write_atomically(paths["manifest"], lambda tmp: write_json(tmp, manifest))


# ------------------------------------------------------------------------------------------- checking and caching


def verify_corpus(root: str | Path, settings: SceneSettings | None = None) -> str | None:
    """Why the corpus at ``root`` can't be reused (a one-line reason), or None when it is complete and matches
    ``settings``: manifest present and for these settings, every file with its recorded size (and sha1 for the small
    text/pickle files, a sampled sha1 for the LMDB / HDF5 feature stores; region JSON files by size only), the region LMDB / HDF5 / JSON and the CLIP HDF5 open with the
    expected number of images."""
    settings = settings or SceneSettings()
    root = Path(root)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest["generator_version"] != GENERATOR_VERSION or manifest["settings"] != settings.to_dict():
            return "manifest is for another generator version or settings"
        count = int(manifest["counts"]["images"])
    except (ValueError, KeyError, TypeError) as e:
        return f"manifest.json is unreadable ({type(e).__name__}: {e})"
    reason = _check_files(root, files)
    if reason is not None:
        return reason
    listed = {entry.get("path") for entry in files if isinstance(entry, dict)}
    for s in SPLITS:  # corpora cached before these writers existed lack them
        for rel in (f"lxmert/mscoco_{s}.json", f"lxmert_text/{s}.jsonl"):
            if rel not in listed:
                return f"{rel} is missing (corpus written by an older writer)"
    try:
        ids: list[str] = []
        for name, reader_cls in (
            ("regions.lmdb", RegionFeatureReader),
            ("regions.hdf5", HDF5RegionReader),
            ("regions_json", FrcnnJsonRegionReader),
        ):
            regions = reader_cls(root / name)
            if len(regions) != count:
                return f"{name} has {len(regions)} images, expected {count}"
            ids = ids or regions.ids()  # the LMDB's ids, looked up in every format
            regions[ids[0]]
            regions[ids[-1]]
            regions.close()
        clip = ClipFeatureReader(root / "clip_features.hdf5")
        if len(clip) != count or clip.dim != settings.clip_dim:
            return f"clip_features.hdf5 has {len(clip)}x{clip.dim} features, expected {count}x{settings.clip_dim}"
        clip.close()
    except DataError as e:
        return str(e)
    return None


def verify_part(root: str | Path, part: str, settings: SceneSettings | None = None) -> str | None:
    """Why task corpus ``part`` at ``root`` can't be reused (one line), or None: its manifest is for ``settings``
    and every file it lists has its recorded size and checksum."""
    settings = settings or SceneSettings()
    manifest_path = _part_manifest(Path(root), part)
    if not manifest_path.is_file():
        return f"parts/{part}.json is missing"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest["generator_version"] != GENERATOR_VERSION or manifest["settings"] != settings.to_dict():
            return f"parts/{part}.json is for another generator version or settings"
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"parts/{part}.json is unreadable ({type(e).__name__}: {e})"
    return _check_files(Path(root), files)


def _check_files(root: Path, files: Sequence[Any]) -> str | None:
    """The first manifest entry whose file is missing, of another size or checksum (one line), else None."""
    for entry in files:
        try:
            rel, expected_size = entry["path"], entry["size"]
        except (KeyError, TypeError):
            return f"manifest.json has a malformed file entry {entry!r}"
        p = root / rel
        try:
            size = p.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != expected_size:
            return f"{rel} has {size} bytes, expected {expected_size}"
        if "sha1" in entry and _sha1(p) != entry["sha1"]:
            return f"{rel} checksum differs"
        if _wants_sampled_hash(rel) and "sha1" not in entry:
            if "sampled_sha1" not in entry:
                return f"{rel} has no checksum (corpus written by an older writer)"
            if _sampled_sha1(p) != entry["sampled_sha1"]:
                return f"{rel} checksum differs (same size: damaged in place)"
    return None


def default_cache_dir() -> Path:
    """``$VL_CACHE_DIR`` or ``~/.cache/vl``."""
    env = os.environ.get("VL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vl"


def ensure_corpus(
    cache_dir: str | Path, settings: SceneSettings | None = None, parts: Sequence[str] | str = ()
) -> Path:
    """Path of a valid corpus for ``settings`` under ``cache_dir/scenes-<key>``, writing it when missing or invalid,
    with the task corpora ``parts`` (names in ``PARTS``, or "all") written into it on first use.

    Reuse is checked with ``verify_corpus`` / ``verify_part`` (fast). A missing/partial/corrupt corpus is written into
    a temporary sibling and renamed into place; a missing or damaged part is rewritten in place, its manifest last.
    Concurrent callers serialise on an ``fcntl.flock`` lock file."""
    import fcntl

    settings = settings or SceneSettings()
    parts = list(PARTS) if parts == "all" else list(parts)
    _check_parts(parts)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = corpus_key(settings)
    final = cache_dir / f"scenes-{key}"
    with open(cache_dir / f".scenes-{key}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            reason = verify_corpus(final, settings) if final.exists() else None
            if final.exists() and reason is None:
                log.debug("reusing scene corpus %s", final)
            else:
                _write_core(cache_dir, key, final, settings, parts, reason)
            _ensure_parts(final, settings, parts)
            return final
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _write_core(
    cache_dir: Path, key: str, final: Path, settings: SceneSettings, parts: list[str], reason: str | None
) -> None:
    t0 = time.perf_counter()
    for leftover in cache_dir.glob(f".scenes-{key}.*-*"):  # from writers that died (we hold the lock)
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = cache_dir / f".scenes-{key}.tmp-{os.getpid()}"
    try:
        write_corpus(tmp, settings, parts)
        if final.exists():
            stale = cache_dir / f".scenes-{key}.stale-{os.getpid()}"
            if stale.exists():
                shutil.rmtree(stale)
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dt = time.perf_counter() - t0
    if reason is not None:
        log.warning("scene corpus %s was invalid (%s); rewrote it in %.1fs", final, reason, dt)
    else:
        log.info("wrote scene corpus %s (%d images, parts %s) in %.1fs", final, settings.num_images, parts, dt)


def _ensure_parts(root: Path, settings: SceneSettings, parts: list[str]) -> None:
    """Write each of ``parts`` that is missing or damaged (the caller holds the corpus lock)."""
    missing = [(part, why) for part in parts if (why := verify_part(root, part, settings)) is not None]
    if not missing:
        return
    t0 = time.perf_counter()
    scenes = generate_scenes(settings)
    for part, why in progress(missing, desc="corpus: task corpora", unit="part"):
        write_part(root, part, scenes, settings)
        log.info("scene corpus %s: wrote task corpus '%s' (%s)", root, part, why)
    log.debug("task corpora written in %.1fs", time.perf_counter() - t0)
