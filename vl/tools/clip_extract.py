"""CLIP image-feature extraction: images -> `clip_features.hdf5` (`features` float32 (N, D), `ids` bytes S{maxlen}),
the layout of `vl.data.features.clip_hdf5.write_clip_hdf5` that `ClipFeatureReader` reads.

    python -m vl.tools.clip_extract --model CLIP_DIR (--images DIR | --jsonl FILE) --out clip_features.hdf5

* `--images DIR`: every image file under DIR (recursive); id = the path relative to DIR without its extension.
* `--jsonl FILE`: lines `{"image_id", "path"}` (a relative path is relative to the JSONL's dir).
* Pre-processing: resize the short side to 224 keeping the aspect ratio (bicubic), centre crop 224x224, scale to
  [0,1], normalise with the model dir's `preprocessor_config.json` mean/std (OpenAI CLIP's when absent).
* Features: `CLIPModel.get_image_features` (projected, not L2-normalised), batched, with a progress bar.
* Resumable: ids already in `--out` are skipped; the file is rewritten (temp file + rename) every
  `--save-every` batches and at the end, so an interrupted run loses at most that much work.

`save_tiny_clip(dir)` writes a tiny random-init CLIP model (+ a byte-level tokenizer and image processor config) for
tests and smoke runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vl.data.formats.jsonl import load_jsonl
from vl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------------- inputs
def list_images(image_dir: str | Path) -> list[tuple[str, Path]]:
    """(id, path) for every image under `image_dir`, sorted; id = relative path without extension."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image directory not found")
    out = []
    for path in sorted(image_dir.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            out.append((path.relative_to(image_dir).with_suffix("").as_posix(), path))
    if not out:
        raise DataError(f"{image_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return out


def read_image_jsonl(path: str | Path) -> list[tuple[str, Path]]:
    """(id, path) from `{"image_id", "path"}` lines; relative paths are relative to the JSONL's directory."""
    path = Path(path)
    out: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for row in load_jsonl(path, required=("image_id", "path")):
        image_id = str(row["image_id"])
        if image_id in seen:
            continue  # the same image listed twice (e.g. one line per caption)
        seen.add(image_id)
        img = Path(row["path"]).expanduser()
        out.append((image_id, img if img.is_absolute() else path.parent / img))
    if not out:
        raise DataError(f"{path}: no images listed")
    return out


# ---------------------------------------------------------------------------------------------------- model
def _norm_stats(model_dir: Path) -> tuple[np.ndarray, np.ndarray, int]:
    cfg_path = model_dir / "preprocessor_config.json"
    mean, std, size = CLIP_MEAN, CLIP_STD, 224
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        crop = cfg.get("crop_size", size)
        size = int(crop.get("height", size) if isinstance(crop, dict) else crop)
    return np.asarray(mean, np.float32), np.asarray(std, np.float32), size


def resized_size(w: int, h: int, size: int = 224) -> tuple[int, int]:
    """(w, h) with the short side `size` and the long side int(long / short x size), truncated as the seed's patched
    `CLIPFeatureExtractor.resize` (`precompute_clip_visual_features.py`): 640 x 480 -> 298 x 224, not 299."""
    long = int(max(w, h) / min(w, h) * size)
    return (long, size) if w > h else (size, long)


def crop_origin(length: int, size: int) -> int:
    """Where a centre crop of `size` starts along a side of `length`: transformers 4.11's
    `CLIPFeatureExtractor.center_crop` (the seed's pin), `int((length - size + 1) * 0.5)`, which rounds an odd margin
    up: 335 -> 56 (`(335 - 224) // 2` is 55)."""
    return int((length - size + 1) * 0.5)


def preprocess(path: Path, mean: np.ndarray, std: np.ndarray, size: int = 224) -> np.ndarray:
    """(3, size, size) float32: short side -> size keeping aspect (bicubic), centre crop, normalise."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
    new_w, new_h = resized_size(*img.size, size)
    img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = crop_origin(new_w, size), crop_origin(new_h, size)
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - mean) / std
    return arr.transpose(2, 0, 1).copy()


def _read_existing(out: Path) -> tuple[list[str], np.ndarray | None]:
    if not out.is_file():
        return [], None
    from vl.data.features.clip_hdf5 import ClipFeatureReader

    reader = ClipFeatureReader(out, in_memory=True)
    ids = reader.ids()
    feats = np.asarray(reader._open(), dtype=np.float32)  # in-memory array
    reader.close()
    return ids, feats


def extract_clip_features(
    images: Sequence[tuple[str, Path]],
    model_dir: str | Path,
    out: str | Path,
    *,
    batch_size: int = 32,
    device: str = "cpu",
    save_every: int = 50,
    progress: bool = True,
) -> dict[str, int]:
    """Extract features for `images` [(id, path)] into `out`, skipping ids already there. Returns counts."""
    from transformers import CLIPModel

    from vl.data.features.clip_hdf5 import write_clip_hdf5

    model_dir, out = Path(model_dir).expanduser(), Path(out)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model: '{model_dir}' is not a local CLIP model dir (no config.json)")
    ids, feats = _read_existing(out)
    done = set(ids)
    todo = [(i, p) for i, p in images if i not in done]
    missing = [str(p) for _, p in todo if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} image file(s) not found, e.g. {missing[:3]}")
    log.info("%s: %d images already extracted, %d to do", out, len(done), len(todo))
    if not todo:
        return {"existing": len(done), "extracted": 0, "total": len(done)}
    model = CLIPModel.from_pretrained(str(model_dir)).to(device).eval()
    dim = int(model.config.projection_dim)
    if feats is not None and feats.shape[1] != dim:
        raise DataError(f"{out}: holds {feats.shape[1]}-d features but the model gives {dim}-d; use another --out")
    mean, std, size = _norm_stats(model_dir)
    chunks: list[np.ndarray] = [] if feats is None else [feats]
    new_ids: list[str] = list(ids)

    def save() -> None:
        write_clip_hdf5(out, new_ids, np.concatenate(chunks) if chunks else np.zeros((0, 1), np.float32))

    try:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="CLIP features", unit="img", disable=not progress)
    except ImportError:  # pragma: no cover
        bar = None
    with torch.no_grad():
        for b, start in enumerate(range(0, len(todo), batch_size), 1):
            batch = todo[start : start + batch_size]
            pixels = torch.from_numpy(np.stack([preprocess(p, mean, std, size) for _, p in batch])).to(device)
            emb = model.get_image_features(pixel_values=pixels)
            if not isinstance(emb, torch.Tensor):
                emb = emb.pooler_output
            chunks.append(emb.float().cpu().numpy())
            new_ids.extend(i for i, _ in batch)
            if bar is not None:
                bar.update(len(batch))
            if save_every and b % save_every == 0:
                save()
    if bar is not None:
        bar.close()
    save()
    return {"existing": len(done), "extracted": len(todo), "total": len(new_ids)}


# ---------------------------------------------------------------------------------------------------- tiny model
def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0..255 (printable Latin-1 bytes map to
    themselves, the rest to code points from 256 up)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def save_tiny_clip(path: str | Path, *, projection_dim: int = 512, image_size: int = 224, seed: int = 0) -> Path:
    """A tiny random-init `CLIPModel` with a byte-level BPE tokenizer (no merges) and a CLIP image processor
    config, saved to `path` (for tests)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    tokenizer.save_pretrained(str(path))
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokens),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": len(tokens) - 2,
            "eos_token_id": len(tokens) - 1,
            "pad_token_id": len(tokens) - 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 32,
        },
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(str(path))
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(str(path))
    return path


# ---------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vl.tools.clip_extract", description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="directory of images (id = relative path without extension)")
    src.add_argument("--jsonl", help='JSONL with {"image_id", "path"} lines')
    parser.add_argument("--model", required=True, help="local CLIP model dir (config.json + weights)")
    parser.add_argument("--out", required=True, help="output HDF5 (e.g. clip_features.hdf5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save-every", type=int, default=50, help="rewrite the HDF5 every N batches (resumability)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        images = list_images(args.images) if args.images else read_image_jsonl(args.jsonl)
        counts = extract_clip_features(
            images,
            args.model,
            args.out,
            batch_size=args.batch_size,
            device=args.device,
            save_every=args.save_every,
            progress=not args.no_progress,
        )
    except (DataError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: {counts['total']} features ({counts['extracted']} new, {counts['existing']} already there)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
