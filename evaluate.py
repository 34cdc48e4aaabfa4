"""Evaluate a checkpoint: `python evaluate.py ckpt_path=outputs/<task>/runs/<time>/checkpoints/last.ckpt`."""

import sys

import hydra
from omegaconf import DictConfig

from vl.compose import register
from vl.errors import VLError

register()  # the structured-config schemas (cached: no torch import to compose) and resolvers


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from vl.pipeline import evaluate

    try:
        evaluate(cfg)
    except VLError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
