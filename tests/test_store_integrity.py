"""The map store's format 2: batched reads, many writers, kill -9, damaged segments found and recomputed,
format 1 converted, settings bound on the first written map, one explain run per store."""

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import store_worker
import zarr
from hydra import compose, initialize_config_dir

import fame.store
from fame.config import ConfigError
from fame.lightning import EmptyMapWarning
from fame.stages import explain
from fame.store import DamagedMaps, LegacyStore, MapStore

ROOT = Path(__file__).resolve().parents[1]
SIZE = (6, 5)


def synthetic(row: int) -> np.ndarray:
    """A smooth map keyed by its row: a Gaussian blob whose centre moves with the row."""
    y, x = np.mgrid[0 : SIZE[0], 0 : SIZE[1]]
    return np.exp(-((y - row % SIZE[0]) ** 2 + (x - row % SIZE[1]) ** 2) / 4.0).astype(np.float32)


def write_rows(path, rows, batch_size=4, delay=0.0):
    """Write ``rows`` (with their synthetic maps, ids and stats) in batches, as one writer."""
    store = MapStore.create_or_open(path, 40, SIZE)
    name = store.begin_method("fame", {"iterations": 3})
    for start in range(0, len(rows), batch_size):
        part = list(rows[start : start + batch_size])
        store.write(
            name,
            part,
            [f"id-{row}" for row in part],
            np.stack([synthetic(row) for row in part]),
            stats={"iterations": [row % 3 for row in part], "final_loss": [row / 10 for row in part]},
        )
        time.sleep(delay)
    store.close()


def run_in_processes(path, shares, **options):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=write_rows, args=(path, share), kwargs=options) for share in shares]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0


def test_batched_reads_equal_one_at_a_time_reads_and_writers_do_not_matter(tmp_path):
    """Two processes writing interleaved rows at once make the store one process makes."""
    write_rows(tmp_path / "one.zarr", list(range(40)))
    run_in_processes(tmp_path / "two.zarr", [list(range(0, 40, 2)), list(range(1, 40, 2))])
    one, two = MapStore(tmp_path / "one.zarr"), MapStore(tmp_path / "two.zarr")
    assert one.ids == two.ids == [f"id-{row}" for row in range(40)]
    np.testing.assert_array_equal(one.read("fame"), two.read("fame"))
    assert one.read_stats("fame").equals(two.read_stats("fame"))
    ids = [f"id-{row}" for row in (17, 3, 39, 0, 22, 3)]
    batched = two.read("fame", ids)
    single = np.concatenate([MapStore(tmp_path / "two.zarr").read("fame", [sample_id]) for sample_id in ids])
    np.testing.assert_array_equal(batched, single)
    np.testing.assert_array_equal(
        batched, np.stack([synthetic(row) for row in (17, 3, 39, 0, 22, 3)]).astype(np.float16)
    )
    files = sorted(path.suffix for path in (tmp_path / "two.zarr" / "fame").iterdir())
    assert files == [".index", ".index", ".json", ".maps", ".maps"]  # per writer one index and one segment


def test_a_writer_starts_a_new_segment_every_segment_maps(tmp_path, monkeypatch):
    monkeypatch.setattr(fame.store, "SEGMENT_MAPS", 8)
    write_rows(tmp_path / "maps.zarr", list(range(40)), batch_size=4)
    files = [path.suffix for path in (tmp_path / "maps.zarr" / "fame").iterdir()]
    assert files.count(".maps") == 5 and files.count(".index") == 1
    np.testing.assert_array_equal(
        MapStore(tmp_path / "maps.zarr").read("fame", ["id-39"]), synthetic(39)[None].astype(np.float16)
    )


def test_kill_9_mid_write_loses_only_batches_in_flight_and_the_rest_resumes(tmp_path):
    path = tmp_path / "maps.zarr"
    context = multiprocessing.get_context("fork")
    writer = context.Process(target=write_rows, args=(path, list(range(40))), kwargs={"batch_size": 2, "delay": 0.05})
    writer.start()
    deadline = time.time() + 60
    while time.time() < deadline and not ((path / "fame").exists() and MapStore(path).completed("fame").sum() >= 6):
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    store = MapStore(path)
    missing = store.missing_rows("fame")
    assert 0 < len(missing) < 40
    written = np.flatnonzero(store.completed("fame"))
    np.testing.assert_array_equal(
        store.read("fame", [f"id-{row}" for row in written]),
        np.stack([synthetic(row) for row in written]).astype(np.float16),
    )
    write_rows(path, missing.tolist())  # the resumed run writes exactly the missing rows
    write_rows(tmp_path / "reference.zarr", list(range(40)))
    resumed, reference = MapStore(path), MapStore(tmp_path / "reference.zarr")
    np.testing.assert_array_equal(resumed.read("fame"), reference.read("fame"))
    assert resumed.read_stats("fame").equals(reference.read_stats("fame"))


def test_an_unfinished_index_line_is_a_batch_in_flight(tmp_path):
    """What a kill in the middle of appending an index line leaves: those rows read as missing."""
    path = tmp_path / "maps.zarr"
    write_rows(path, list(range(8)), batch_size=4)
    (index,) = (path / "fame").glob("*.index")
    lines = index.read_bytes().splitlines(keepends=True)
    index.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2])
    store = MapStore(path)
    assert store.missing_rows("fame").tolist() == list(range(4, 40)) and store.ids == [f"id-{row}" for row in range(4)]


def test_a_damaged_index_line_is_reported_and_its_rows_read_as_missing(tmp_path):
    path = tmp_path / "maps.zarr"
    write_rows(path, list(range(8)), batch_size=4)
    (index,) = (path / "fame").glob("*.index")
    data = bytearray(index.read_bytes())
    data[20] ^= 0x01  # inside the first line's JSON
    index.write_bytes(bytes(data))
    with pytest.warns(
        fame.store.DamagedIndexWarning, match="line 1 after byte 0 fails its checksum or is not an index record"
    ):
        store = MapStore(path)
        assert store.missing_rows("fame").tolist() == [0, 1, 2, 3, *range(8, 40)]
    np.testing.assert_array_equal(store.read("fame", ["id-5"]), synthetic(5)[None].astype(np.float16))


@pytest.mark.parametrize(
    "change",
    [{"segment": "../../../etc/passwd"}, {"rows": [-1]}, {"rows": [40]}, {"offsets": ["0"]}, {"stats": [[1, 2]]}],
)
def test_an_index_record_with_a_valid_checksum_is_still_checked(tmp_path, change):
    """Index files are data: a record naming a file outside the entry or rows outside the store is not used."""
    path = tmp_path / "maps.zarr"
    write_rows(path, [0], batch_size=1)
    (index,) = (path / "fame").glob("*.index")
    record = fame.store._parse_index_line(index.read_bytes().strip())
    index.write_bytes(fame.store._index_line({**record, **change}))
    with pytest.warns(fame.store.DamagedIndexWarning, match="is not an index record"):
        assert MapStore(path).missing_rows("fame").size == 40


def stage_config(output, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(
            config_name="explain",
            overrides=[
                f"paths.output_dir={output}",
                "experiment=shapes",
                "checkpoint=null",
                "limit=6",
                "batch_size=4",
                "trainer.enable_progress_bar=false",
                f"store={output}/maps.zarr",
                *overrides,
            ],
        )


def delete(segment: Path) -> None:
    segment.unlink()


def truncate(segment: Path) -> None:
    segment.write_bytes(segment.read_bytes()[: segment.stat().st_size // 2])


def flip_a_bit(segment: Path) -> None:
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0x10
    segment.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, count", [(delete, 6), (truncate, None), (flip_a_bit, 1)])
def test_a_damaged_segment_is_named_on_read_and_recomputed_by_explain(tmp_path, caplog, damage, count):
    store = explain(stage_config(tmp_path, "explainer=[random]"))
    intact = store.read("random")
    (segment,) = (tmp_path / "maps.zarr" / "random").glob("*.maps")
    damage(segment)
    with pytest.raises(DamagedMaps) as damaged:
        MapStore(store.path).read("random")
    error = damaged.value
    assert error.entry == "random"
    assert len(error.rows) == count if count else 0 < len(error.rows) < 6  # a cut-short segment keeps its head
    assert error.ids == store.read_stats("random").loc[error.rows, "id"].tolist()
    message = str(error)
    assert "\n" not in message and "random" in message and str(error.rows[0]) in message and error.ids[0] in message
    assert MapStore(store.path).missing_rows("random").size == 0  # written, but not readable
    caplog.clear()
    caplog.set_level(logging.INFO, logger="fame")
    store = explain(stage_config(tmp_path, "explainer=[random]"))
    printed = caplog.text
    assert f"random: {len(error.rows)} stored maps are damaged" in printed and error.ids[0] in printed
    assert f"{len(error.rows)} samples explained" in printed
    np.testing.assert_array_equal(MapStore(store.path).read("random"), intact)  # the random floor is seeded per id


def test_settings_bind_once_a_map_is_written(tmp_path):
    store = MapStore.create_or_open(tmp_path / "maps.zarr", 4, SIZE)
    assert store.begin_method("gradcam", {"layer": "nope"}, provenance={"run": 1}) == "gradcam"
    assert (
        store.begin_method("gradcam", {"layer": None}, provenance={"run": 2}) == "gradcam"
    )  # nothing written: replaced
    assert store.method_settings("gradcam") == {"layer": None} and store.method_provenance("gradcam") == {"run": 2}
    store.write("gradcam", [0], ["a"], synthetic(0)[None])
    with pytest.raises(fame.store.StoreMismatch, match="layer: stored None, requested 'nope'"):
        store.begin_method("gradcam", {"layer": "nope"})


def test_a_run_that_failed_in_a_method_does_not_block_the_corrected_rerun(tmp_path):
    with pytest.raises(Exception, match="nope"):
        explain(stage_config(tmp_path, "explainer=[gradcam]", "explainer.gradcam.layer=nope"))
    store = explain(stage_config(tmp_path, "explainer=[gradcam]"))
    assert store.methods == ["gradcam"] and store.missing_rows("gradcam").size == 0
    assert store.method_settings("gradcam")["method"]["layer"] is None


def test_explain_py_is_refused_while_another_run_holds_the_store(tmp_path):
    store = explain(stage_config(tmp_path, "explainer=[random]"))
    with store.claim():
        with pytest.raises(
            ConfigError, match=rf"being written by another explain run \(pid {os.getpid()} on .*\); wait"
        ):
            explain(stage_config(tmp_path, "explainer=[random]"))
    assert explain(stage_config(tmp_path, "explainer=[random]")).missing_rows("random").size == 0


def test_a_second_run_is_refused_while_the_first_writes_and_a_killed_run_leaves_no_lock(tmp_path):
    """Two runs as explain.py makes them (tests/store_worker.py): the second is refused in one line
    while the first writes; after a kill -9 of the first, the rerun computes exactly the missing rows."""
    path, trace = tmp_path / "maps.zarr", tmp_path / "trace"
    first = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "store_worker.py"),
            str(path),
            "--samples",
            "15",
            "--batch-size",
            "2",
            "--delay",
            "0.3",
            "--trace",
            str(trace),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((path / "random").exists() and MapStore(path).completed("random").any()):
            time.sleep(0.05)
        with pytest.raises(ConfigError, match=rf"another explain run \(pid {first.pid} on "):
            store_worker.explain(path, samples=15, batch_size=2)
    finally:
        first.kill()  # SIGKILL mid-run: the kernel releases its lock
        first.wait()
    store = MapStore(path)
    missing = {method: [f"img-{row:03d}" for row in store.missing_rows(method)] for method in ("fame", "random")}
    assert 0 < len(missing["random"]) < 15
    for part in tmp_path.glob("trace.*"):
        part.unlink()
    with pytest.warns(EmptyMapWarning):
        store_worker.explain(path, samples=15, batch_size=2, trace=str(trace))
    computed = {}
    for part in tmp_path.glob("trace.*"):
        for line in part.read_text().splitlines():
            method, sample_id = line.split()
            computed.setdefault(method, []).append(sample_id)
    assert {method: sorted(ids) for method, ids in computed.items()} == {m: ids for m, ids in missing.items() if ids}


def legacy_store(path: Path, maps: np.ndarray, ids, done) -> None:
    """A store of format 1 as fame wrote it: zarr arrays with one chunk per row."""
    count, height, width = maps.shape
    root = zarr.open_group(
        str(path),
        mode="w-",
        zarr_format=3,
        attributes={
            "fame_map_store": 1,
            "num_samples": count,
            "height": height,
            "width": width,
            "meta": {"split": "val"},
        },
    )
    root.create_array("ids", shape=(count,), chunks=(1,), dtype=str, fill_value="")[:] = np.array(ids)
    method = root.create_group(
        "fame", attributes={"settings": {"iterations": 3}, "outputs": [""], "provenance": {"checkpoint": "a.ckpt"}}
    )
    method.create_array("maps", shape=maps.shape, chunks=(1, height, width), dtype="float16", fill_value=0)[:] = maps
    stats = method.create_array("stats", shape=(count, 3), chunks=(1, 3), dtype="float32", fill_value=float("nan"))
    stats[:] = np.arange(count * 3, dtype=np.float32).reshape(count, 3)
    method.create_array("done", shape=(count,), chunks=(1,), dtype="bool", fill_value=False)[:] = done


def test_a_store_of_format_1_names_the_conversion_command_which_works(tmp_path, capsys):
    maps = np.stack([synthetic(row) for row in range(5)]).astype(np.float16)
    done = np.array([True, True, False, True, True])
    legacy_store(tmp_path / "old.zarr", maps, [f"id-{row}" if done[row] else "" for row in range(5)], done)
    with pytest.raises(LegacyStore, match=rf"python -m fame.store convert {tmp_path / 'old.zarr'} NEW_PATH"):
        MapStore(tmp_path / "old.zarr")
    with pytest.raises(LegacyStore):
        MapStore.create_or_open(tmp_path / "old.zarr", 5, (6, 5))  # never rebuilt over
    converted = subprocess.run(
        [sys.executable, "-m", "fame.store", "convert", str(tmp_path / "old.zarr"), str(tmp_path / "new.zarr")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
    )
    assert converted.returncode == 0, converted.stderr
    store = MapStore(tmp_path / "new.zarr")
    assert store.meta == {"split": "val"} and store.method_settings("fame") == {"iterations": 3}
    assert store.method_provenance("fame") == {"checkpoint": "a.ckpt"} and store.missing_rows("fame").tolist() == [2]
    kept = [0, 1, 3, 4]
    np.testing.assert_array_equal(store.read("fame", [f"id-{row}" for row in kept]), maps[kept])
    stats = store.read_stats("fame")
    assert stats.index.tolist() == kept and stats["final_loss"].tolist() == [3 * row + 2 for row in kept]
    assert fame.store.main(["convert", str(tmp_path / "old.zarr"), str(tmp_path / "new.zarr")]) == 2
    assert "exists" in capsys.readouterr().err
