"""Two-process CPU DDP explain runs (gloo) write exactly the maps of a single-process run, each id once.

Lightning's predict sampler is unpadded (``UnrepeatedDistributedSamplerWrapper``): with an odd
sample count the ranks get uneven shares and no row is repeated.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from store_worker import explain

from fame.lightning import EmptyMapWarning
from fame.store import MapStore

WORKER = Path(__file__).parent / "store_worker.py"
SAMPLES = 13


def computed_by_process(trace: Path):
    """{pid: {method: [ids]}} from the trace files."""
    result = {}
    for part in trace.parent.glob(trace.name + ".*"):
        per_method = result.setdefault(part.suffix[1:], {})
        for line in part.read_text().splitlines():
            method, sample_id = line.split()
            per_method.setdefault(method, []).append(sample_id)
    return result


def check_against_single_process(tmp_path: Path, store: MapStore, trace: Path) -> None:
    with pytest.warns(EmptyMapWarning):
        single = explain(tmp_path / "single.zarr", samples=SAMPLES, batch_size=2)
    assert store.ids == single.ids == [f"img-{i:03d}" for i in range(SAMPLES)]
    for method in ("fame", "random"):
        np.testing.assert_array_equal(store.read(method), single.read(method))
        assert store.read_stats(method).equals(single.read_stats(method))
    by_process = computed_by_process(trace)
    assert len(by_process) == 2, "both ranks computed maps"
    for method in ("fame", "random"):
        ids = sorted(sample_id for methods in by_process.values() for sample_id in methods[method])
        assert ids == store.ids  # every id exactly once over both ranks
    assert sorted(len(methods["fame"]) for methods in by_process.values()) == [6, 7]
    (run,) = [json.loads(line) for line in Path(f"{store.path}.runs.jsonl").read_text().splitlines()]
    assert run["world_size"] == 2 and run["methods"]["fame"]["samples"] == SAMPLES and run["empty_maps"] == {"fame": 3}


def test_two_forked_ranks_match_one_process(tmp_path):
    """``ddp_fork``: the ranks are forks of this process (Lightning gives each one intra-op thread)."""
    trace = tmp_path / "trace"
    store = explain(
        tmp_path / "ddp.zarr", samples=SAMPLES, batch_size=2, devices=2, strategy="ddp_fork", trace=str(trace)
    )
    check_against_single_process(tmp_path, store, trace)


def test_two_launched_ranks_match_one_process(tmp_path):
    """``ddp`` as on a cluster: Lightning starts rank 1 by running the script again; both create the
    store and begin the methods at the same time."""
    trace = tmp_path / "trace"
    command = [
        sys.executable,
        str(WORKER),
        str(tmp_path / "ddp.zarr"),
        "--samples",
        str(SAMPLES),
        "--batch-size",
        "2",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--trace",
        str(trace),
    ]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    check_against_single_process(tmp_path, MapStore(tmp_path / "ddp.zarr"), trace)
