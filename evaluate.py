"""python evaluate.py [key=value ...]: see configs/evaluate.yaml."""

import hydra
from omegaconf import DictConfig

from fame import pipeline


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(config: DictConfig) -> None:
    pipeline.evaluate(config)


if __name__ == "__main__":
    main()
