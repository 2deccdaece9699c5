"""The zarr map store: rows and ids, float16 maps, stats, settings checks, atomic and concurrent creation."""

import hashlib
import json
import multiprocessing

import numpy as np
import pytest
import torch
from store_worker import create_and_write

from fame.provenance import checkpoint_digest, environment
from fame.store import MapStore, StoreMismatch

FAME = {"explainer": {"iterations": 50, "epsilon": None}, "checkpoint": {"sha256": "aa11"}, "version": "0.1.0"}


def test_rows_ids_float16_maps_and_stats(tmp_path):
    store = MapStore.create_or_open(tmp_path / "maps.zarr", num_samples=5, size=(4, 3), meta={"split": "test"})
    assert store.begin_method("fame", FAME, provenance={"checkpoint": "/ckpt/a.ckpt"}) == "fame"
    assert store.missing_rows("fame").tolist() == [0, 1, 2, 3, 4] and store.ids == []
    maps = torch.rand(2, 1, 4, 3)
    store.write(
        "fame",
        [3, 0],
        ["s3", "s0"],
        maps,
        stats={"iterations": torch.tensor([7, 0]), "initial_loss": [1.5, -0.2], "final_loss": np.array([0.1, -0.2])},
    )
    reopened = MapStore(tmp_path / "maps.zarr")
    assert reopened.ids == ["s0", "s3"] and reopened.rows(["s3"]).tolist() == [3]
    assert reopened.missing_rows("fame").tolist() == [1, 2, 4]
    assert reopened.meta == {"split": "test"} and reopened.methods == ["fame"] and reopened.entries == ["fame"]
    assert reopened.method_settings("fame") == FAME
    assert reopened.method_provenance("fame") == {"checkpoint": "/ckpt/a.ckpt"}
    read = reopened.read("fame", ["s0", "s3"])
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read, maps.numpy()[[1, 0], 0].astype(np.float16).astype(np.float32))
    stats = reopened.read_stats("fame")
    assert stats["id"].tolist() == ["s0", "s3"] and stats.index.tolist() == [0, 3]
    assert stats["iterations"].tolist() == [0.0, 7.0] and stats["initial_loss"].tolist() == pytest.approx([-0.2, 1.5])
    with pytest.raises(ValueError, match="never written"):
        reopened.read("fame")
    reopened.begin_method("random", {"seed": 0})
    reopened.write("random", [0, 1, 2, 3, 4], [f"s{i}" for i in range(5)], np.ones((5, 4, 3)))
    assert reopened.completed("random").all() and reopened.read_stats("random")["iterations"].isna().all()
    assert reopened.ids == [f"s{i}" for i in range(5)] and reopened.read("random").shape == (5, 4, 3)


def test_outputs_are_entries_of_one_method(tmp_path):
    store = MapStore.create_or_open(tmp_path / "pairs.zarr", 3, (2, 2))
    assert store.begin_method("fame", FAME, outputs=["similar", "dissimilar"]) == "fame"
    assert store.outputs("fame") == ["fame/similar", "fame/dissimilar"] and store.methods == ["fame"]
    store.write("fame/similar", [1], ["p1"], np.full((1, 2, 2), 0.25))
    assert store.missing_rows("fame/similar").tolist() == [0, 2]
    assert store.missing_rows("fame").tolist() == [0, 1, 2]  # a method is done when every output is
    assert store.method_settings("fame/dissimilar") == FAME
    with pytest.raises(StoreMismatch, match=r"outputs\.?.*stored \['similar', 'dissimilar'\], requested \[''\]"):
        store.begin_method("fame", FAME)


def test_mismatched_settings_name_every_key_and_new_group_keeps_both(tmp_path):
    store = MapStore.create_or_open(tmp_path / "maps.zarr", 4, (2, 2))
    store.begin_method("fame", FAME)
    store.write("fame", [0], ["a"], np.zeros((1, 2, 2)))  # the settings bind once a map is written
    other = {
        "explainer": {"iterations": 100, "epsilon": None, "blur_kernel": 5},
        "checkpoint": {"sha256": "bb22"},
        "version": "0.1.0",
    }
    with pytest.raises(StoreMismatch) as refused:
        store.begin_method("fame", other)
    message = str(refused.value)
    assert "explainer.iterations: stored 50, requested 100" in message
    assert "checkpoint.sha256: stored 'aa11', requested 'bb22'" in message
    assert "explainer.blur_kernel: stored (absent), requested 5" in message
    assert "version" not in message.split("\n", 1)[1].split("These maps")[0]
    assert "another store path" in message and "new_group=True" in message and "'fame@2'" in message
    assert [key for key, _, _ in refused.value.differences] == [
        "checkpoint.sha256",
        "explainer.blur_kernel",
        "explainer.iterations",
    ]
    assert store.begin_method("fame", other, new_group=True) == "fame@2"
    assert store.begin_method("fame", other, new_group=True) == "fame@2"  # resumes the group with these settings
    assert store.begin_method("fame", FAME, new_group=True) == "fame"
    assert store.methods == ["fame", "fame@2"] and store.method_settings("fame@2")["checkpoint"]["sha256"] == "bb22"
    with pytest.raises(StoreMismatch, match="num_samples: stored 4, requested 5"):
        MapStore.create_or_open(tmp_path / "maps.zarr", 5, (2, 2))
    with pytest.raises(StoreMismatch, match="meta.split: stored .absent., requested 'val'"):
        MapStore.create_or_open(tmp_path / "maps.zarr", 4, (2, 2), meta={"split": "val"})


def test_write_errors_say_what_was_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="run explain.py first"):
        MapStore(tmp_path / "absent.zarr")
    store = MapStore.create_or_open(tmp_path / "maps.zarr", 2, (2, 2))
    store.begin_method("fame", FAME)
    with pytest.raises(KeyError, match="no method 'gradcam'"):
        store.write("gradcam", [0], ["a"], np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match=r"shape \(1, 1, 2, 2\)"):
        store.write("fame", [0], ["a"], np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match=r"distinct dataset indices in \[0, 2\)"):
        store.write("fame", [2], ["a"], np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match=r"maps of \['b'\] are not finite"):
        store.write("fame", [0, 1], ["a", "b"], np.array([np.zeros((2, 2)), np.full((2, 2), np.nan)]))
    with pytest.raises(ValueError, match=r"stats must map some of .* to 1 values each, got \{'iterations': 2\}"):
        store.write("fame", [0], ["a"], np.zeros((1, 2, 2)), stats={"iterations": [1, 2]})
    with pytest.raises(ValueError, match=r"got \{'steps': 1\}"):
        store.write("fame", [0], ["a"], np.zeros((1, 2, 2)), stats={"steps": [1]})
    assert not store.completed("fame").any()
    store.write("fame", [0], ["a"], np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="row 0 .* holds sample 'a', not 'z'.*dataset's order"):
        store.write("fame", [0], ["z"], np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match="'@' suffix|letters, digits"):
        store.begin_method("fa/me", FAME)


def test_half_created_store_is_rebuilt_and_legacy_store_refused(tmp_path):
    # what a kill between creating the root group and writing its attributes left behind
    half = tmp_path / "half.zarr"
    (half / "fame" / "maps").mkdir(parents=True)
    (half / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    with pytest.raises(ValueError, match="creation was interrupted"):
        MapStore(half)
    store = MapStore.create_or_open(half, 3, (2, 2))
    assert store.methods == [] and store.num_samples == 3
    truncated = tmp_path / "truncated.zarr"
    truncated.mkdir()
    (truncated / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    assert MapStore.create_or_open(truncated, 3, (2, 2)).size == (2, 2)
    # a method directory without settings (damaged by hand) is rebuilt by begin_method
    (store.path / "gradcam").mkdir()
    assert store.begin_method("gradcam", {}) == "gradcam" and store.methods == ["gradcam"]
    legacy = tmp_path / "legacy.zarr"
    legacy.mkdir()
    (legacy / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"ids": ["a"], "height": 2, "width": 2}})
    )
    with pytest.raises(ValueError, match="older fame version"):
        MapStore.create_or_open(legacy, 1, (2, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half.zarr", "legacy.zarr", "truncated.zarr"]


def test_concurrent_creation_from_several_processes(tmp_path):
    """Processes released at the same instant create one store and one method; every write lands."""
    path = tmp_path / "race.zarr"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(4)
    workers = [context.Process(target=create_and_write, args=(path, 6, row, barrier)) for row in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    store = MapStore(path)
    assert store.methods == ["fame"] and store.missing_rows("fame").tolist() == [4, 5]
    assert store.ids == ["img-000", "img-001", "img-002", "img-003"]
    np.testing.assert_array_equal(store.read("fame", store.ids), np.full((4, 12, 12), 0.5, dtype=np.float32))
    assert [p.name for p in tmp_path.iterdir()] == ["race.zarr"]  # the losers' staging directories are gone
    assert list((path / ".staging").iterdir()) == []


def test_provenance(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"weights")
    assert checkpoint_digest(checkpoint, block_size=3) == hashlib.sha256(b"weights").hexdigest()
    info = environment()
    assert info["torch"] == torch.__version__ and info["fame"] == "0.1.0" and "commit" in info["git"]
