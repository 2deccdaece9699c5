"""python explain.py [experiment=NAME] [explainer=[fame,gradcam,...]] [key=value ...]: see configs/explain.yaml.

With -m (Hydra multirun) each sweep point writes its own store into its job folder, beside Hydra's
record of its overrides; evaluate.py sweep=<sweep folder> turns them into a table and a plot.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from fame.entry import check_group_choices, log_to_console, one_line_errors
from fame.stages import explain, featuremap
from fame.sweeps import job_files_subdir, prepare_sweep_job

CONFIGS = Path(__file__).resolve().parent / "configs"
OmegaConf.register_new_resolver("sweep_job_files", job_files_subdir, replace=True)  # hydra.output_subdir


@hydra.main(config_path="configs", config_name="explain", version_base="1.3")
def main(config: DictConfig) -> None:
    log_to_console()  # the stages' messages on stdout, from rank zero
    with one_line_errors("explain.py", config):  # bad input: one line on stderr, exit 2, no traceback
        prepare_sweep_job(config)
        if config.get("featuremap"):  # experiment=featuremap: the Sec. 4.1 experiment instead of a map store
            featuremap(config)
        else:
            explain(config)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], CONFIGS, "explain.py")
    main()
