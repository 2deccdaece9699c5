"""Checkpoint reading: weights_only by default, an explicit opt-in for pickled objects, strict state_dicts."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from fame.models import UntrustedCheckpointError, load_checkpoint, load_state_dict_strictly, state_dict_in, strip_prefix


def test_tensors_and_containers_load_safely(tmp_path) -> None:
    path = tmp_path / "weights.pt"
    content = {"state_dict": {"w": torch.arange(3.0)}, "epoch": 2, "names": ["a", "b"]}
    torch.save(content, path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 2 and loaded["names"] == ["a", "b"]
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(3.0))


def test_pickled_objects_need_an_explicit_opt_in(tmp_path) -> None:
    path = tmp_path / "lightning.ckpt"
    torch.save({"hyper_parameters": argparse.Namespace(lr=0.1), "state_dict": {}}, path)
    with pytest.raises(UntrustedCheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and "argparse.Namespace" in message and "trust=True" in message
    assert load_checkpoint(path, trust=True)["hyper_parameters"].lr == 0.1


def test_missing_file_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="gone.ckpt"):
        load_checkpoint(tmp_path / "gone.ckpt")


def test_state_dict_in_unwraps_and_rejects() -> None:
    weights = {"w": torch.zeros(1)}
    assert state_dict_in(weights, source="f.pt") == weights
    assert state_dict_in({"state_dict": weights, "epoch": 1}, source="f.ckpt", wrappers=("state_dict",)) == weights
    with pytest.raises(TypeError, match=r"f.pt: expected a state_dict.*got Linear.*not the model object"):
        state_dict_in(nn.Linear(2, 2), source="f.pt")


def test_strip_prefix_only_touches_prefixed_keys() -> None:
    assert list(strip_prefix({"module.a": 1, "b": 2, "x.module.c": 3}, "module.")) == ["a", "b", "x.module.c"]


def test_strict_load_checks_everything_then_loads() -> None:
    source = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    target = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    state = source.state_dict()
    load_state_dict_strictly(target, state, source="s.pt", expected="toy")
    assert all(torch.equal(target.state_dict()[key], value) for key, value in state.items())
    wrong_shape = r"s.pt does not match toy: 1 shape mismatch\(es\): 0.bias \(expected \(3,\), file has \(4,\)\)\. Hint"
    with pytest.raises(ValueError, match=wrong_shape):
        load_state_dict_strictly(
            target, {**state, "0.bias": torch.zeros(4)}, source="s.pt", expected="toy", hint="Hint"
        )
    with pytest.raises(ValueError, match="not tensors: 0.weight"):
        load_state_dict_strictly(target, {**state, "0.weight": [[0.0, 0.0]] * 3}, source="s.pt", expected="toy")
