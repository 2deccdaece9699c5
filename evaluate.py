"""python evaluate.py [experiment=NAME] [sweep=INDEX] [key=value ...]: see configs/evaluate.yaml."""

import sys

import hydra
from omegaconf import DictConfig

from fame.config import ConfigError
from fame.stages import evaluate


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(config: DictConfig) -> None:
    try:
        evaluate(config)
    except (ConfigError, FileNotFoundError) as error:  # a bad value or a missing file: no traceback
        print(f"evaluate.py: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
