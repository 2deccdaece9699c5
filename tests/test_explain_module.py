"""ExplainModule + MapWriter under Trainer.predict: every row written once, only missing rows
recomputed, empty maps reported, a kill -9 mid-run followed by a rerun equals an uninterrupted run."""

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from nets import TinyClassifier
from store_worker import FAME_OPTIONS, SETTINGS, SIZE, NoiseImages, explain, explain_after_fork
from torch.utils.data import DataLoader

from fame.explain.registry import MethodResult, get_method
from fame.lightning import EmptyMapWarning, ExplainMethod, ExplainModule, Indexed, MapWriter, MissingRows
from fame.store import MapStore


def traced(trace: Path):
    """{method: [ids computed]} from the trace files of every process."""
    computed = {}
    for part in sorted(trace.parent.glob(trace.name + ".*")):
        for line in part.read_text().splitlines():
            method, sample_id = line.split()
            computed.setdefault(method, []).append(sample_id)
    return computed


def test_predict_writes_every_row_with_stats_log_and_empty_map_warning(tmp_path):
    with pytest.warns(EmptyMapWarning, match=r"fame: 3 of 13 maps are empty .* e\.g\. img-000, img-005, img-010"):
        store = explain(tmp_path / "maps.zarr", samples=13, batch_size=4, trace=str(tmp_path / "trace"))
    dataset = NoiseImages(13)
    images = torch.stack([dataset[i]["image"] for i in range(13)])
    labels = torch.tensor([dataset[i]["label"] for i in range(13)])
    ids = [dataset[i]["id"] for i in range(13)]
    direct = get_method("fame", "classification")(
        TinyClassifier(seed=0).double(), images, labels, ids=ids, **FAME_OPTIONS
    )
    assert store.ids == ids and store.entries == ["fame", "random"]
    np.testing.assert_array_equal(
        store.read("fame"), direct.maps[""][:, 0].numpy().astype(np.float16).astype(np.float32)
    )
    stats = store.read_stats("fame")
    np.testing.assert_array_equal(stats["iterations"].to_numpy(), direct.stats[""].iterations.float().numpy())
    np.testing.assert_allclose(
        stats["initial_loss"].to_numpy(), direct.stats[""].initial_loss.float().numpy(), rtol=1e-6
    )
    assert stats["id"].tolist() == ids and store.read_stats("random")["iterations"].isna().all()
    assert store.method_settings("fame") == json.loads(json.dumps(SETTINGS["fame"]))
    assert traced(tmp_path / "trace") == {"fame": ids, "random": ids}
    (run,) = [json.loads(line) for line in (tmp_path / "maps.zarr.runs.jsonl").read_text().splitlines()]
    assert run["methods"]["fame"]["samples"] == 13 and run["methods"]["random"]["samples"] == 13
    assert run["empty_maps"] == {"fame": 3} and run["world_size"] == 1
    assert run["environment"]["torch"] == torch.__version__ and "commit" in run["environment"]["git"]


def test_only_missing_rows_are_computed_per_method(tmp_path):
    path = tmp_path / "maps.zarr"
    store = MapStore.create_or_open(path, num_samples=7, size=(SIZE, SIZE), meta={"data": "noise"})
    store.begin_method("fame", SETTINGS["fame"])
    store.write("fame", [1, 4], ["img-001", "img-004"], np.full((2, SIZE, SIZE), 0.5))
    with pytest.warns(EmptyMapWarning):
        explain(path, samples=7, batch_size=3, trace=str(tmp_path / "trace"))
    computed = traced(tmp_path / "trace")
    assert computed["fame"] == ["img-000", "img-002", "img-003", "img-005", "img-006"]
    assert computed["random"] == [f"img-{i:03d}" for i in range(7)]
    np.testing.assert_array_equal(store.read("fame", ["img-004"]), np.full((1, SIZE, SIZE), 0.5, dtype=np.float32))
    assert len(MissingRows(NoiseImages(7), store, ["fame", "random"])) == 0
    assert explain(path, samples=7, batch_size=3, trace=str(tmp_path / "again")) is not None
    assert traced(tmp_path / "again") == {}


def test_killed_run_resumes_to_the_maps_of_an_uninterrupted_run(tmp_path):
    with pytest.warns(EmptyMapWarning):
        reference = explain(tmp_path / "reference.zarr", samples=11, batch_size=2)
    path, trace = tmp_path / "maps.zarr", tmp_path / "trace"
    context = multiprocessing.get_context("fork")
    run = context.Process(
        target=explain_after_fork, args=(path,), kwargs=dict(samples=11, batch_size=2, delay=0.3, trace=str(trace))
    )
    run.start()
    deadline = time.time() + 120
    while time.time() < deadline and run.is_alive():
        if (
            (path / "zarr.json").exists()
            and (path / "random").exists()
            and MapStore(path).completed("random").sum() >= 4
        ):
            break
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)
    run.join()
    assert run.exitcode == -signal.SIGKILL
    store = MapStore(path)
    missing = {method: [f"img-{row:03d}" for row in store.missing_rows(method)] for method in ("fame", "random")}
    assert 0 < len(missing["random"]) < 11, "the run was killed before or after its batches"
    for part in tmp_path.glob("trace.*"):
        part.unlink()
    with pytest.warns(EmptyMapWarning):
        explain(path, samples=11, batch_size=2, trace=str(trace))
    assert traced(trace) == missing  # only what the kill left missing was recomputed
    for method in ("fame", "random"):
        np.testing.assert_array_equal(store.read(method), reference.read(method))
        assert store.read_stats(method).equals(reference.read_stats(method))


def test_predict_step_checks_its_inputs_and_results(tmp_path):
    store = MapStore.create_or_open(tmp_path / "maps.zarr", num_samples=3, size=(SIZE, SIZE))
    name = store.begin_method("pair", {}, outputs=["similar", "dissimilar"])

    def one_map(model, batch):
        return MethodResult({"": torch.zeros(len(batch["id"]), 1, SIZE, SIZE)})

    module = ExplainModule(TinyClassifier().double(), [ExplainMethod(name, one_map)], store.path)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[MapWriter(store.path)],
    )
    loader = DataLoader(Indexed(NoiseImages(3)), batch_size=3)
    with pytest.raises(
        ValueError, match=r"made maps \['pair'\], but its store entries are \['pair/similar', 'pair/dissimilar'\]"
    ):
        trainer.predict(module, loader, return_predictions=False)
    with pytest.raises(ValueError, match="return_predictions=False"):
        trainer.predict(module, loader)
    with pytest.raises(KeyError, match="wrap the dataset in fame.lightning.Indexed"):
        trainer.predict(module, DataLoader(NoiseImages(3), batch_size=3), return_predictions=False)
    with pytest.raises(TypeError, match="dicts with an 'id'"):
        Indexed([torch.zeros(3)])[0]
    with pytest.raises(ValueError, match="dataset has 4 samples but the map store .* has 3 rows"):
        MissingRows(NoiseImages(4), store, [name])
