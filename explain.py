"""python explain.py [key=value ...]: see configs/explain.yaml."""

import hydra
from omegaconf import DictConfig

from fame import pipeline


@hydra.main(config_path="configs", config_name="explain", version_base="1.3")
def main(config: DictConfig) -> None:
    pipeline.explain(config)


if __name__ == "__main__":
    main()
