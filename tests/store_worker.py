"""An explain run on tiny data, as a script: the process the kill -9 and DDP tests start.

    python tests/store_worker.py STORE --samples 15 --batch-size 2 [--devices 2 --strategy ddp]
        [--delay 0.3] [--trace FILE]

It writes FAME (few steps, epsilon -0.2 so some samples take no step) and the random floor for a
deterministic dataset with a float64 TinyClassifier (float64 keeps maps independent of how rows
are batched, so runs split differently must agree exactly). ``--trace`` appends "<method> <id>"
per computed sample to ``FILE.<pid>``; ``--delay`` sleeps after each method's batch.
``explain_after_fork`` is the process the kill -9 test kills; ``create_and_write`` is what the
processes of the concurrent-creation test run.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch.utils.data import Dataset

from fame.store import MapStore

SIZE = 12
FAME_OPTIONS = {"iterations": 4, "step_size": 0.05, "epsilon": -0.2, "blur_kernel": 3, "blur_sigma": 1.0}
SETTINGS = {
    "fame": {"options": FAME_OPTIONS, "model": "TinyClassifier(seed=0).double()"},
    "random": {"options": {"seed": 7}},
}


class NoiseImages(Dataset):
    """Image ``i`` is noise seeded by ``i`` (float64), label ``i % 5``, id ``img-<i>``."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        generator = torch.Generator().manual_seed(index)
        image = torch.rand(3, SIZE, SIZE, generator=generator, dtype=torch.float64)
        return {"image": image, "label": index % 5, "id": f"img-{index:03d}"}


class Compute:
    """A registered classification method on a batch dict, optionally slowed down and traced."""

    def __init__(self, name: str, options: dict, delay: float = 0.0, trace: str | None = None):
        self.name, self.options, self.delay, self.trace = name, options, delay, trace

    def __call__(self, model, batch):
        from fame.explain.registry import get_method

        result = get_method(self.name, "classification")(
            model, batch["image"], batch["label"], ids=batch["id"], **self.options
        )
        if self.trace:
            with open(f"{self.trace}.{os.getpid()}", "a") as file:
                file.writelines(f"{self.name} {sample_id}\n" for sample_id in batch["id"])
        time.sleep(self.delay)
        return result


def explain(
    store_path,
    samples: int,
    batch_size: int,
    devices: int = 1,
    strategy: str = "auto",
    delay: float = 0.0,
    trace: str | None = None,
    methods=("fame", "random"),
) -> MapStore:
    """Explain ``NoiseImages(samples)`` into the store at ``store_path`` as explain.py does."""
    from fame.stages.explain import claim_for_run  # imported here so that ``create`` processes start quickly

    dataset = NoiseImages(samples)
    store = MapStore.create_or_open(store_path, num_samples=samples, size=(SIZE, SIZE), meta={"data": "noise"})
    claim = claim_for_run(store)  # as explain.py: the launched DDP rank writes without it
    try:
        return explain_rows(store, dataset, batch_size, devices, strategy, delay, trace, methods)
    finally:
        if claim is not None:
            claim.release()


def explain_rows(store, dataset, batch_size, devices, strategy, delay, trace, methods) -> MapStore:
    """The rows of ``dataset`` still missing in ``store``, explained through ``Trainer.predict``."""
    import lightning as L
    from nets import TinyClassifier
    from torch.utils.data import DataLoader

    from fame.lightning.explain import ExplainMethod, ExplainModule, ExplainProgressBar, MapWriter, MissingRows

    entries = [
        ExplainMethod(
            store.begin_method(name, SETTINGS[name], provenance={"script": __file__}),
            Compute(name, SETTINGS[name]["options"], delay, trace),
        )
        for name in methods
    ]
    rows = MissingRows(dataset, store, [entry.name for entry in entries])
    if len(rows) == 0:
        return store
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[MapWriter(store.path), ExplainProgressBar()],
    )
    module = ExplainModule(TinyClassifier(seed=0).double(), entries, store.path)
    trainer.predict(module, DataLoader(rows, batch_size=batch_size), return_predictions=False)
    return store


def explain_after_fork(*arguments, **options) -> None:
    """``explain`` in a process forked from one that already ran torch ops: with one intra-op
    thread, since the parent's OpenMP thread pool does not survive the fork (it would hang)."""
    torch.set_num_threads(1)
    explain(*arguments, **options)


def create_and_write(store_path, samples: int, row: int, barrier) -> None:
    """Wait at ``barrier`` for the other processes, then race them creating the store and method; write ``row``."""
    barrier.wait()
    store = MapStore.create_or_open(store_path, num_samples=samples, size=(SIZE, SIZE), meta={"data": "noise"})
    name = store.begin_method("fame", SETTINGS["fame"], provenance={"pid": os.getpid()})
    store.write(name, [row], [f"img-{row:03d}"], np.full((1, SIZE, SIZE), 0.5))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--trace")
    arguments = parser.parse_args()
    explain(
        arguments.store,
        arguments.samples,
        arguments.batch_size,
        arguments.devices,
        arguments.strategy,
        arguments.delay,
        arguments.trace,
    )


if __name__ == "__main__":
    main()
