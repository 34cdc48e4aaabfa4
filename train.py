"""Train a vision-and-language model. `python train.py --help` lists config groups; see README.md."""

import sys

import hydra
from omegaconf import DictConfig

from vl.compose import register
from vl.errors import VLError

register()  # the structured-config schemas (cached: no torch import to compose) and resolvers


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from vl.pipeline import train

    try:
        _, value = train(cfg)
    except VLError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return value


if __name__ == "__main__":
    main()
