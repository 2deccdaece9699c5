"""Every command in REPRODUCING.md still names existing scripts, config groups and keys: the entry points'
configs are composed with Hydra's compose API and checked against their schema (nothing runs), so renaming a
key or a group breaks this test."""

import ast
import itertools
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fame.schemas import EvaluateConfig, ExplainConfig, FeaturemapConfig, TrainConfig, check

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"train.py": "train", "explain.py": "explain", "evaluate.py": "evaluate"}
SCHEMAS = {"train": TrainConfig, "explain": ExplainConfig, "evaluate": EvaluateConfig}
# Folders the commands name as shell variables; any value composes, the paths are only read when a stage runs.
VARIABLES = {"IMAGENET": "/data/imagenet", "ARFACE": "/data/arface", "SCFACE": "/data/scface", "CHECKPOINTS": "/ckpt"}


def commands():
    """The `python ...` lines of REPRODUCING.md's bash blocks, continuation lines joined, as argument lists."""
    text = (ROOT / "REPRODUCING.md").read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                expanded = re.sub(r"\$(\w+)", lambda match: VARIABLES[match.group(1)], line)
                found.append(shlex.split(expanded))
    return found


COMMANDS = commands()


def sweep_points(overrides):
    """The overrides of each point of a Hydra multirun (`-m key=a,b`): values split at commas outside brackets."""
    choices = []
    for override in overrides:
        key, _, value = override.partition("=")
        values = re.split(r",(?![^\[]*\])", value) if "," in value and not value.startswith("[") else [value]
        choices.append([f"{key}={v}" for v in values])
    return [list(point) for point in itertools.product(*choices)]


def test_reproducing_names_every_paper_result():
    text = (ROOT / "REPRODUCING.md").read_text(encoding="utf-8")
    for heading in ("## Tab. 1", "## Tab. 2", "## Tab. 3", "## Fig. 1 and Sec. 4.1", "## The comparison sheets"):
        assert heading in text
    assert {STAGES[c[1]] for c in COMMANDS if c[0] == "python" and c[1] in STAGES} == {"train", "explain", "evaluate"}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c)[:80])
def test_command_composes(command):
    program, *arguments = command
    if program == "jupyter":
        assert arguments[:2] == ["nbconvert", "--execute"] and (ROOT / arguments[-1]).is_file()
        return
    assert program == "python", f"unexpected command {command}"
    if arguments[0] == "-c":
        ast.parse(arguments[1])
        return
    script, *overrides = arguments
    assert (ROOT / script).is_file(), f"{script} does not exist"
    multirun = "-m" in overrides
    overrides = [o for o in overrides if o != "-m"]
    points = sweep_points(overrides) if multirun else [overrides]
    assert not multirun or len(points) > 1, "a -m command without a sweep"
    for point in points:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            config = compose(config_name=STAGES[script], overrides=point)
        stage = STAGES[script]
        check(FeaturemapConfig if stage == "explain" and config.get("featuremap") else SCHEMAS[stage], config)
