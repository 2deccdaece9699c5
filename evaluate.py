"""python evaluate.py [experiment=NAME] [sweep=INDEX] [key=value ...]: see configs/evaluate.yaml."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fame.entry import check_group_choices, log_to_console, one_line_errors
from fame.stages import evaluate

CONFIGS = Path(__file__).resolve().parent / "configs"


@hydra.main(config_path="configs", config_name="evaluate", version_base="1.3")
def main(config: DictConfig) -> None:
    log_to_console()  # the stages' messages on stdout, from rank zero
    with one_line_errors("evaluate.py", config):  # bad input: one line on stderr, exit 2, no traceback
        evaluate(config)


if __name__ == "__main__":
    check_group_choices(sys.argv[1:], CONFIGS, "evaluate.py")
    main()
