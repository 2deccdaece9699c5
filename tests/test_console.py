"""The stages' messages: rank-zero loggers (fame.lightning.rank_zero) shown by the entry points' console."""

import logging
import os
import subprocess
import sys
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

from fame.lightning.rank_zero import rank_zero_logger

ROOT = Path(__file__).resolve().parents[1]
#: An entry point's console setup, then one message of a stage's logger and one warning of another fame logger.
SCRIPT = """
import logging
from fame.entry import log_to_console
from fame.lightning.rank_zero import rank_zero_logger
log_to_console()
rank_zero_logger("fame.stages.example").info("training in runs/abc")
logging.getLogger("fame.data.example").warning("skipping corrupt sample 3")
"""


def test_only_global_rank_zero_emits(caplog, monkeypatch):
    log = rank_zero_logger("fame.stages.example")
    assert rank_zero_logger("fame.stages.example") is log and len(log.filters) == 1  # the filter is added once
    caplog.set_level(logging.INFO, logger="fame")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    log.info("from rank one")
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    log.info("from rank zero")
    assert [record.getMessage() for record in caplog.records] == ["from rank zero"]


def run_script(**environment):
    """The script in a fresh process, as rank zero unless ``environment`` names a launcher's rank."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "LOCAL_RANK", "SLURM_PROCID")}
    env.update(PYTHONWARNINGS="ignore", **environment)
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True
    )


def test_the_console_shows_messages_on_stdout_and_warnings_on_stderr():
    done = run_script()
    assert done.stdout == "training in runs/abc\n"
    assert "skipping corrupt sample 3" in done.stderr and "skipping" not in done.stdout


def test_a_launched_rank_shows_no_stage_message():
    done = run_script(LOCAL_RANK="1")
    assert done.stdout == ""
