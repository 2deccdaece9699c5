"""python train.py [key=value ...]: see configs/train.yaml."""

import hydra
from omegaconf import DictConfig

from fame import pipeline


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(config: DictConfig) -> None:
    pipeline.train(config)


if __name__ == "__main__":
    main()
