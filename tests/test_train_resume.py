"""train.py killed with SIGKILL and rerun ends exactly where an uninterrupted run of the same command does.

Each case runs the entry point in subprocesses on tiny data: an uninterrupted reference run, and a
run killed once the checkpoint of its first epoch is on disk, then rerun with the same command
(``resume=auto`` continues it), for the shapes once more after a mid-epoch checkpoint of its
second epoch. The final validation metrics (metrics.yaml) and every tensor of the final weights
(model.ckpt) must be equal.
"""

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import Dataset, DistributedSampler

from fame.data.modules import EpochShuffle, resumable_loader
from fame.stages.train import readable_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("limit=128", "data.image_size=32", "data.datamodule.batch_size=16", "trainer.max_epochs=2")
SHAPES_STEPS_PER_EPOCH = 8
#: Checkpoints every 3 steps instead of every epoch: callbacks are not part of the run folder's
#: digest, so a run started with them continues the same run.
MID_EPOCH = ("callbacks.resume.every_n_train_steps=3", "callbacks.resume.every_n_epochs=null")
FACES = (
    "experiment=faces",
    "module/head=adaface",
    "limit=64",
    "data.image_size=32",
    "data.datamodule.training.batch_size=16",
    "data.datamodule.verification.synthetic.limit=24",
    "module.folds=2",
    "module.embedding_size=32",
    "trainer.max_epochs=2",
    "callbacks.monitor.num_probes=2",
    "callbacks.monitor.fame.iterations=2",
    "callbacks.monitor.baseline=null",
    "callbacks.monitor.log_images=false",
)


def start(output: Path, *overrides: str) -> subprocess.Popen:
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        f"paths.output_dir={output}",
        f"paths.experiment_dir={output}",
        "logger.enabled=false",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]
    # One intra-op thread: two OpenMP threads per process stall each other on a shared machine.
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )  # its own process group: the job with any DDP ranks it starts


def finish(process: subprocess.Popen) -> str:
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0, out
    return out


def run_folder(output: Path) -> Path:
    (run,) = (output / "train" / "runs").iterdir()
    return run


def complete(path: Path) -> bool:
    """A torch.save zip with its central directory written (a checkpoint not cut short)."""
    try:
        zipfile.ZipFile(path).close()
        return True
    except (zipfile.BadZipFile, OSError):
        return False


def kill_once_written(process: subprocess.Popen, output: Path, pattern: str) -> dict:
    """SIGKILL the run (its process group: every rank) as soon as a complete checkpoint named like
    ``pattern`` is in its folder; return the checkpoint the rerun resumes from (train.py's choice)."""
    deadline = time.time() + 240
    while not [path for path in (output / "train" / "runs").glob(f"*/{pattern}") if complete(path)]:
        assert process.poll() is None, f"the run ended before {pattern} was written:\n{process.stdout.read()}"
        assert time.time() < deadline, f"no {pattern} within 240 s"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run_folder(output) / "FINISHED").exists()
    return torch.load(readable_checkpoint(run_folder(output)), map_location="cpu", weights_only=True)


def loader_position(checkpoint: dict) -> list:
    return checkpoint["loops"]["fit_loop"]["state_dict"].get("combined_loader")


def final(output: Path):
    run = run_folder(output)
    assert (run / "FINISHED").exists()
    metrics = yaml.safe_load((run / "metrics.yaml").read_text())
    weights = torch.load(run / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return metrics, weights


def assert_same_run(expected, actual):
    (expected_metrics, expected_weights), (metrics, weights) = expected, actual
    assert metrics == expected_metrics
    assert expected_weights.keys() == weights.keys()
    different = [key for key in expected_weights if not torch.equal(expected_weights[key], weights[key])]
    assert not different, f"tensors that differ: {different}"


@pytest.fixture(scope="module")
def shapes_reference(tmp_path_factory):
    """An uninterrupted run; a second one and one loading with two worker processes alongside it."""
    outputs = [tmp_path_factory.mktemp(name) for name in ("uninterrupted", "again", "workers")]
    processes = [
        start(outputs[0], *SHAPES),
        start(outputs[1], *SHAPES),
        start(outputs[2], *SHAPES, "data.datamodule.num_workers=2"),
    ]
    for process in processes:
        finish(process)
    return [final(output) for output in outputs]


def test_two_uninterrupted_runs_end_identically(shapes_reference):
    assert_same_run(shapes_reference[0], shapes_reference[1])


def test_worker_processes_do_not_change_the_run(shapes_reference):
    """Order, flips and worker seeds come from the loaders' own generators and keys, never from
    the global random state that dropout draws from."""
    assert_same_run(shapes_reference[0], shapes_reference[2])


def test_killed_in_the_second_epoch_and_again_mid_epoch_ends_as_the_uninterrupted_run(shapes_reference, tmp_path):
    """Killed after the first epoch's checkpoint; rerun with checkpoints every 3 steps and killed
    after the one at step 12 (the rerun resumes from step 9 or 12, mid-way through the second
    epoch of 8 steps); rerun again to the end."""
    resumed_from = kill_once_written(start(tmp_path, *SHAPES), tmp_path, "last.ckpt")
    assert resumed_from["epoch"] == 0 and resumed_from["global_step"] == SHAPES_STEPS_PER_EPOCH

    resumed_from = kill_once_written(start(tmp_path, *SHAPES, *MID_EPOCH), tmp_path, "epoch=1-step=12.ckpt")
    assert resumed_from["global_step"] in (9, 12)
    assert loader_position(resumed_from) == [
        {"epoch": 1, "batches": resumed_from["global_step"] - SHAPES_STEPS_PER_EPOCH}
    ]

    out = finish(start(tmp_path, *SHAPES))
    assert f"resuming the unfinished run {run_folder(tmp_path)}" in out
    assert_same_run(shapes_reference[0], final(tmp_path))


def test_faces_killed_in_the_second_epoch_and_rerun_ends_as_the_uninterrupted_run(tmp_path):
    """AdaFace (running feature-norm statistics in the head) on synthetic identities, with the
    explanation monitor checking every epoch."""
    reference, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    uninterrupted = start(reference, *FACES)
    resumed_from = kill_once_written(start(interrupted, *FACES), interrupted, "last.ckpt")
    assert resumed_from["epoch"] == 0
    out = finish(start(interrupted, *FACES))
    assert "resuming the unfinished run" in out
    finish(uninterrupted)
    assert_same_run(final(reference), final(interrupted))


@pytest.mark.slow
def test_two_process_ddp_killed_in_the_second_epoch_and_rerun_ends_as_the_uninterrupted_run(tmp_path):
    """trainer=cpu_ddp (two gloo processes): each rank's share of the (seed, epoch) order and each
    rank's random states come back; about a minute on two cores."""
    overrides = (*SHAPES, "trainer=cpu_ddp")
    reference, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    uninterrupted = start(reference, *overrides)
    resumed_from = kill_once_written(start(interrupted, *overrides), interrupted, "last.ckpt")
    assert resumed_from["epoch"] == 0 and len(resumed_from["callbacks"]["ExactResume"]["ranks"]) == 2
    assert "resuming the unfinished run" in finish(start(interrupted, *overrides))
    finish(uninterrupted)
    assert_same_run(final(reference), final(interrupted))


class Numbered(Dataset):
    """Item i is {"id": str(i)}: a batch shows which samples it holds."""

    def __len__(self) -> int:
        return 37

    def __getitem__(self, index: int) -> dict:
        return {"id": str(index)}


def epoch_batches(loader, epoch: int) -> list:
    loader.sampler.set_epoch(epoch)  # what Lightning does before each epoch
    return [batch["id"] for batch in loader]


def epoch_ids(loader, epoch: int) -> list:
    return [i for batch in epoch_batches(loader, epoch) for i in batch]


def test_epoch_order_is_a_function_of_seed_and_epoch_and_shards_over_ranks():
    loader = resumable_loader(Numbered(), batch_size=4, seed=5)
    first, second = epoch_ids(loader, 0), epoch_ids(loader, 1)
    assert sorted(first, key=int) == [str(i) for i in range(37)] and first != second
    assert epoch_ids(resumable_loader(Numbered(), batch_size=4, seed=5), 1) == second  # a new process, same order
    assert epoch_ids(resumable_loader(Numbered(), batch_size=4, seed=6), 1) != second
    expected = [str(i) for i in DistributedSampler(Numbered(), num_replicas=2, rank=0, shuffle=True, seed=5)]
    sampler = EpochShuffle(Numbered(), seed=5, num_replicas=2, rank=0)
    assert [
        str(i) for i in sampler
    ] == expected  # torch's DistributedSampler order: rank r takes positions r, r + 2, ...


def test_a_loader_restored_mid_epoch_yields_the_rest_of_that_epoch():
    loader = resumable_loader(Numbered(), batch_size=4, seed=5)
    uninterrupted = epoch_batches(loader, 2)
    batches = iter(loader)
    consumed = [next(batches)["id"] for _ in range(3)]
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches": 3} and consumed == uninterrupted[:3]
    restored = resumable_loader(Numbered(), batch_size=4, seed=5)
    restored.load_state_dict(state)
    assert [batch["id"] for batch in restored] == uninterrupted[3:]
    assert restored.state_dict() == {"epoch": 2, "batches": len(uninterrupted)}
    assert epoch_ids(restored, 3) == epoch_ids(loader, 3)  # the next epoch is whole again
    restored.load_state_dict({"epoch": 2, "batches": len(uninterrupted)})  # taken after the last batch
    assert restored.sampler.epoch == 3 and len([batch for batch in restored]) == len(uninterrupted)
