"""python train.py [experiment=NAME] [key=value ...]: see configs/train.yaml."""

import sys

import hydra
from omegaconf import DictConfig

from fame.config import ConfigError
from fame.stages import train


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(config: DictConfig) -> None:
    try:
        train(config)
    except (ConfigError, FileNotFoundError) as error:  # a bad value or a missing file: no traceback
        print(f"train.py: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
