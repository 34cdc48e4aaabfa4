"""`python -m vl.tools.scenes --out DIR [--num-images N --seed S --image-size P]`: write the embedded scene corpus."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vl.data.scenes import SceneSettings, write_corpus


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m vl.tools.scenes") -> int:
    """Write a corpus into ``--out`` (``python -m vl.tools.scenes``)."""
    parser = argparse.ArgumentParser(prog=prog, description="Write the procedural scene corpus.")
    parser.add_argument("--out", required=True, type=Path, help="directory to write the corpus into")
    defaults = SceneSettings()
    parser.add_argument("--num-images", type=int, default=defaults.num_images)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    args = parser.parse_args(argv)
    try:
        settings = SceneSettings(seed=args.seed, num_images=args.num_images, image_size=args.image_size)
    except ValueError as e:
        parser.error(str(e))
    t0 = time.perf_counter()
    root = write_corpus(args.out, settings)
    print(f"wrote {settings.num_images} scenes to {root.resolve()} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
