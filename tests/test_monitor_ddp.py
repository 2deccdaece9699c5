"""The explanation monitor under 2-process CPU DDP (gloo) gathers the same maps as one process.

The test runs this file as a script (``python tests/test_monitor_ddp.py OUT``): Lightning's DDP
launcher starts the second rank by running the same command again, and every rank saves what its
monitors gathered to ``OUT/rank<r>.pt``.
"""

import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from fame.data import ShortcutShapesDataset
from fame.data.modules import ClassificationDataModule
from fame.lightning.classifier import ImageClassifier
from fame.lightning.monitor import ExplanationMonitor

FAME = {"iterations": 3, "blur_kernel": 7, "blur_sigma": 1.0}
#: An odd count (rank 0 explains 3 probes, rank 1 two) and a single probe (rank 1 explains none).
PROBE_COUNTS = (5, 1)


def validate_with_monitors(out: Path, **trainer_options) -> list:
    """Validate a seeded small CNN on the shortcut data with one monitor per probe count."""
    L.seed_everything(0)
    module = ImageClassifier(model={"_target_": "fame.models.SmallCNN", "num_classes": 4, "widths": [4, 8, 8, 8]})
    data = ClassificationDataModule(val=ShortcutShapesDataset(9, image_size=32, seed=2, strength=0.0), batch_size=4)
    monitors = [
        ExplanationMonitor(num_probes=count, fame=FAME, dirpath=str(out / f"probes{count}")) for count in PROBE_COUNTS
    ]
    trainer = L.Trainer(
        callbacks=monitors,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
        **trainer_options,
    )
    trainer.validate(module, datamodule=data, verbose=False)
    return [{"history": m.history, "maps": m.previous_maps} for m in monitors]


def test_ddp_gathers_every_probe_once_with_the_single_process_maps(tmp_path):
    launched = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parent.parent,
    )
    assert launched.returncode == 0, launched.stderr[-4000:]
    single = validate_with_monitors(tmp_path / "single", accelerator="cpu", devices=1)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for count, alone, *distributed in zip(PROBE_COUNTS, single, *ranks):
        for gathered in distributed:  # every rank holds the gathered result
            (record,) = gathered["history"]
            explained = record["explained"]
            ids = [sample_id for sample_id, _ in explained]
            assert len(ids) == len(set(ids)) == count
            assert sorted(ids) == sorted(sample_id for sample_id, _ in alone["history"][0]["explained"])
            owner = {sample_id: rank for sample_id, rank in explained}
            order = [sample_id for sample_id, _ in alone["history"][0]["explained"]]
            assert [owner[sample_id] for sample_id in order] == [k % 2 for k in range(count)]
            for method, maps in alone["maps"].items():
                assert set(gathered["maps"][method]) == set(maps)
                for sample_id, expected in maps.items():
                    torch.testing.assert_close(
                        gathered["maps"][method][sample_id].float(), expected.float(), atol=2e-3, rtol=0
                    )
            metrics, reference = record["metrics"], alone["history"][0]["metrics"]
            assert set(metrics) == set(reference)
            for name in reference:
                if name != "monitor/seconds":
                    assert abs(metrics[name] - reference[name]) < 1e-3, name
        assert (tmp_path / f"probes{count}" / "monitor" / "epoch_000.png").exists()


if __name__ == "__main__":
    torch.set_num_threads(1)
    output = Path(sys.argv[1])
    results = validate_with_monitors(output, accelerator="cpu", devices=2, strategy="ddp")
    torch.save(results, output / f"rank{torch.distributed.get_rank()}.pt")
