"""python explain.py [experiment=NAME] [explainer=[fame,gradcam,...]] [key=value ...]: see configs/explain.yaml.

With -m (Hydra multirun) each sweep point writes its own store under the sweep folder and a line
to its sweep index, which evaluate.py sweep=<index> turns into a table and a plot.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fame.entry import check_group_choices, one_line_errors
from fame.stages import explain, featuremap
from fame.stages.sweeps import prepare_sweep_job

CONFIGS = Path(__file__).resolve().parent / "configs"


@hydra.main(config_path="configs", config_name="explain", version_base="1.3")
def main(config: DictConfig) -> None:
    with one_line_errors("explain.py", config):  # bad input: one line on stderr, exit 2, no traceback
        prepare_sweep_job(config)
        if config.get("featuremap"):  # experiment=featuremap: the Sec. 4.1 experiment instead of a map store
            featuremap(config)
        else:
            explain(config)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], CONFIGS, "explain.py")
    main()
