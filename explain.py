"""python explain.py [experiment=NAME] [explainer=[fame,gradcam,...]] [key=value ...]: see configs/explain.yaml.

With -m (Hydra multirun) each sweep point writes its own store under the sweep folder and a line
to its sweep index, which evaluate.py sweep=<index> turns into a table and a plot.
"""

import sys

import hydra
from omegaconf import DictConfig

from fame.config import ConfigError
from fame.stages import explain
from fame.stages.sweeps import prepare_sweep_job


@hydra.main(config_path="configs", config_name="explain", version_base="1.3")
def main(config: DictConfig) -> None:
    try:
        prepare_sweep_job(config)
        explain(config)
    except (ConfigError, FileNotFoundError) as error:  # a bad value or a missing file: no traceback
        print(f"explain.py: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
