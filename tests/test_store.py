"""The zarr map store: round trip, resume, and refusing to mix sample sets."""

import numpy as np
import pytest
import torch

from fame.store import MapStore


def test_round_trip_resume_and_reopen(tmp_path):
    ids = [f"s{i}" for i in range(5)]
    store = MapStore(tmp_path / "maps.zarr", ids=ids, size=(4, 3), meta={"split": "test"})
    assert store.missing("fame") == ids
    first = torch.rand(2, 1, 4, 3)
    store.write("fame", ["s3", "s0"], first)
    assert store.missing("fame") == ["s1", "s2", "s4"]
    reopened = MapStore(tmp_path / "maps.zarr")
    assert reopened.meta == {"split": "test"} and reopened.methods == ["fame"]
    np.testing.assert_allclose(reopened.read("fame", ["s0", "s3"]), first.numpy()[[1, 0], 0])
    with pytest.raises(ValueError, match="never written"):
        reopened.read("fame")
    reopened.write("fame", ["s1", "s2", "s4"], np.ones((3, 4, 3)))
    assert reopened.completed("fame").all() and reopened.read("fame").shape == (5, 4, 3)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run explain.py first"):
        MapStore(tmp_path / "absent.zarr")
    store = MapStore(tmp_path / "maps.zarr", ids=["a", "b"], size=(2, 2))
    with pytest.raises(ValueError, match="different set"):
        MapStore(tmp_path / "maps.zarr", ids=["a", "c"], size=(2, 2))
    with pytest.raises(ValueError, match=r"shape \(1, 1, 2, 2\)"):
        store.write("fame", ["a"], np.zeros((1, 3, 3)))
    with pytest.raises(KeyError, match="'z' is not in the map store"):
        store.write("fame", ["z"], np.zeros((1, 2, 2)))
    with pytest.raises(KeyError, match="no maps for method 'gradcam'"):
        store.read("gradcam")
    with pytest.raises(ValueError, match="unique"):
        MapStore(tmp_path / "dup.zarr", ids=["a", "a"], size=(2, 2))
