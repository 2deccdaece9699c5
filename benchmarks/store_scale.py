"""The map store at scale: write and read speed, batch read latency, files and bytes per map (issue 15).

    python benchmarks/store_scale.py                # 1k, 10k, 50k rows of 224 px maps; evaluate at 1k and 10k (~20 min)
    python benchmarks/store_scale.py --quick        # smoke run: small stores, 32 px, evaluate on 40 samples

Maps are synthetic but look like attribution maps: one to four Gaussian blobs of random centre,
width and weight per map, scaled to [0, 1] (a pool of 256, cycled), written as one writer (one
explain rank) in batches of 64 like ``MapWriter``. Per store size it reports

- write throughput (maps/s of ``MapStore.write``, float16 conversion, compression and checksums included),
- the time to open the store and load its index (the first call that needs it),
- read throughput over every row in batches of 64 consecutive ids, from a freshly opened store,
- the latency of reading 64 random ids (median and 90th percentile of 20 batches, index loaded),
- ``verify`` time (the CRC-32 pass explain.py makes over an entry before it resumes),
- files per map and bytes per map of the method's directory.

The files were just written, so reads come from the page cache. The evaluate section builds a
store of the shapes demo (64 px, test split lengthened to the row count) with blob maps, scores it
with ``fame.stages.evaluate.score_store`` (the model built from the config) and splits out the
time spent in ``MapStore`` calls. The localization family alone is the cheapest scoring, so the
store's largest share: it runs at 1k and 10k rows. Localization, ROAD (zero imputation) and
deletion / insertion run at 1k rows; ROAD's linear imputation is left out, as on two CPU cores it
costs over a second per sample (a smaller store share still, and a 10k run of hours). Results go to
``<out>/store_scale.{json,md}`` (``store_scale_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fame.store import MapStore

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64


def blob_maps(count: int, size: int, seed: int = 0) -> np.ndarray:
    """(count, size, size) float32 maps in [0, 1]: sums of one to four Gaussian blobs."""
    generator = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    maps = np.zeros((count, size, size), dtype=np.float32)
    for one in maps:
        for _ in range(generator.integers(1, 5)):
            cy, cx = generator.uniform(0, size, 2)
            width = generator.uniform(0.04, 0.2) * size
            one += generator.uniform(0.3, 1.0) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * width**2))
        one /= one.max()
    return maps


def directory_size(path: Path):
    files = [entry for entry in path.rglob("*") if entry.is_file()]
    return len(files), sum(entry.stat().st_size for entry in files)


def scale_figures(rows: int, size: int, folder: Path) -> dict:
    pool = blob_maps(256, size)
    path = folder / f"scale-{rows}.zarr"
    store = MapStore.create_or_open(path, rows, (size, size), meta={"benchmark": "store_scale"})
    name = store.begin_method("blobs", {"maps": "gaussian blobs"})
    writing = 0.0
    for start in range(0, rows, BATCH):
        part = np.arange(start, min(start + BATCH, rows))
        maps = pool[part % len(pool)]
        begin = time.perf_counter()
        store.write(name, part, [f"sample-{row:06d}" for row in part], maps, stats={"iterations": part % 7})
        writing += time.perf_counter() - begin
    store.close()
    files, size_bytes = directory_size(path / name)

    begin = time.perf_counter()
    fresh = MapStore(path)
    fresh.completed(name)
    opening = time.perf_counter() - begin
    ids = [f"sample-{row:06d}" for row in range(rows)]
    begin = time.perf_counter()
    for start in range(0, rows, BATCH):
        fresh.read(name, ids[start : start + BATCH])
    reading = time.perf_counter() - begin

    generator = np.random.default_rng(1)
    latencies = []
    for _ in range(20):
        chosen = [ids[k] for k in generator.choice(rows, size=min(BATCH, rows), replace=False)]
        begin = time.perf_counter()
        maps = fresh.read(name, chosen)
        latencies.append(time.perf_counter() - begin)
    expected = pool[np.array([int(i.split("-")[1]) for i in chosen]) % len(pool)].astype(np.float16)
    assert np.array_equal(maps, expected.astype(np.float32)), "read back other maps than written"
    begin = time.perf_counter()
    damaged = fresh.verify(name)
    verifying = time.perf_counter() - begin
    assert not damaged
    shutil.rmtree(path)
    return {
        "rows": rows,
        "size": size,
        "write_maps_per_s": rows / writing,
        "open_and_index_s": opening,
        "read_maps_per_s": rows / reading,
        "batch_read_median_s": float(np.median(latencies)),
        "batch_read_p90_s": float(np.percentile(latencies, 90)),
        "verify_s": verifying,
        "files_per_map": files / rows,
        "bytes_per_map": size_bytes / rows,
        "raw_bytes_per_map": size * size * 2,
    }


class StoreClock:
    """Wall time spent inside ``MapStore`` methods (outermost calls only) while it is installed."""

    METHODS = (
        "read",
        "read_stats",
        "completed",
        "missing_rows",
        "rows",
        "outputs",
        "method_settings",
        "method_provenance",
        "verify",
        "__init__",
    )

    def __init__(self):
        self.seconds, self._depth, self._originals = 0.0, 0, {}

    def __enter__(self):
        for name in self.METHODS:
            original = getattr(MapStore, name)
            self._originals[name] = original
            setattr(MapStore, name, self._timed(original))
        for name in ("methods", "entries", "ids"):
            prop = getattr(MapStore, name)
            self._originals[name] = prop
            setattr(MapStore, name, property(self._timed(prop.fget)))
        return self

    def _timed(self, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            self._depth += 1
            begin = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - begin

        return timed

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(MapStore, name, original)


def evaluate_figures(rows: int, folder: Path, families: str) -> dict:
    from hydra import compose, initialize_config_dir

    from fame.config import plain
    from fame.pipeline import explained_dataset
    from fame.stages.evaluate import score_store
    from fame.stages.explain import without_loader_keys

    data = [f"data.datamodule.test.length={rows}", f"limit={rows}"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        explain_config = compose(
            "explain", overrides=["experiment=shapes", "checkpoint=null", *data, f"paths.output_dir={folder}"]
        )
        evaluate_config = compose(
            "evaluate",
            overrides=[
                "experiment=shapes",
                "checkpoint=null",
                f"families=[{families}]",
                f"store={folder}/eval-{rows}.zarr",
                f"paths.output_dir={folder}",
                "device=cpu",
                "exclude_empty=false",
                "road.imputations=[zero]",
            ],
        )
    dataset = explained_dataset(explain_config)
    size = tuple(dataset[0]["image"].shape[-2:])
    store = MapStore.create_or_open(
        evaluate_config.store,
        num_samples=len(dataset),
        size=size,
        meta={
            "task": "classification",
            "data": without_loader_keys(plain(explain_config.data)),
            "split": explain_config.split,
            "limit": explain_config.limit,
        },
    )
    name = store.begin_method("blobs", {"target": "label"})
    pool = blob_maps(256, size[0], seed=2)
    for start in range(0, len(dataset), BATCH):
        part = np.arange(start, min(start + BATCH, len(dataset)))
        store.write(name, part, [str(dataset[int(k)]["id"]) for k in part], pool[part % len(pool)])
    store.close()
    with StoreClock() as clock:
        begin = time.perf_counter()
        frame, _ = score_store(evaluate_config, MapStore(evaluate_config.store))
        total = time.perf_counter() - begin
    shutil.rmtree(evaluate_config.store)
    assert len(dataset) == rows
    return {
        "rows": rows,
        "families": families,
        "seconds": total,
        "ms_per_sample": 1000 * total / rows,
        "store_seconds": clock.seconds,
        "store_ms_per_sample": 1000 * clock.seconds / rows,
        "store_share": clock.seconds / total,
        "scores": len(frame),
    }


def markdown(figures: dict) -> str:
    lines = [
        f"# Map store at scale ({'quick' if figures['quick'] else 'full'})",
        "",
        f"{figures['machine']}; one writer, batches of {BATCH}, synthetic blob maps; reads from the page cache.",
        "",
        "| rows | px | write maps/s | open + index s | read maps/s | batch of 64 median s | p90 s | verify s | "
        "files/map | bytes/map (raw) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in figures["scale"]:
        lines.append(
            f"| {row['rows']:,} | {row['size']} | {row['write_maps_per_s']:.0f} | {row['open_and_index_s']:.3f} | "
            f"{row['read_maps_per_s']:.0f} | {row['batch_read_median_s']:.4f} | {row['batch_read_p90_s']:.4f} | "
            f"{row['verify_s']:.2f} | {row['files_per_map']:.5f} | {row['bytes_per_map']:.0f} "
            f"({row['raw_bytes_per_map']}) |"
        )
    lines += [
        "",
        "evaluate stage (`score_store`, shapes demo, 64 px, model from the config, CPU, ROAD zero imputation):",
        "",
        "| rows | families | ms per sample | store ms per sample | store share |",
        "|---|---|---|---|---|",
    ]
    for row in figures["evaluate"]:
        lines.append(
            f"| {row['rows']:,} | {row['families'].replace(',', ', ')} | {row['ms_per_sample']:.2f} | "
            f"{row['store_ms_per_sample']:.3f} | "
            f"{100 * row['store_share']:.2f} % |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small stores at 32 px: a smoke run")
    parser.add_argument("--rows", type=int, nargs="+", help="store sizes (default 1000 10000 50000)")
    parser.add_argument(
        "--evaluate-rows", type=int, nargs="*", help="evaluate-stage sizes, localization family (default 1000 10000)"
    )
    parser.add_argument(
        "--all-families-rows",
        type=int,
        nargs="*",
        help="evaluate-stage sizes with localization, ROAD and deletion (default 1000)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--work", type=Path, default=None, help="where the stores are written (default: a temporary folder)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    rows = options.rows or ([64, 640] if options.quick else [1000, 10000, 50000])
    evaluate_rows = (
        options.evaluate_rows if options.evaluate_rows is not None else ([40] if options.quick else [1000, 10000])
    )
    all_families_rows = (
        options.all_families_rows if options.all_families_rows is not None else ([] if options.quick else [1000])
    )
    evaluations = [(count, "localization") for count in evaluate_rows] + [
        (count, "localization,road,deletion") for count in all_families_rows
    ]
    size = 32 if options.quick else 224
    figures = {
        "quick": options.quick,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}",
        "scale": [],
        "evaluate": [],
    }
    with tempfile.TemporaryDirectory(dir=options.work) as work:
        for count in rows:
            figures["scale"].append(scale_figures(count, size, Path(work)))
            print(json.dumps(figures["scale"][-1]), flush=True)
        for count, families in evaluations:
            figures["evaluate"].append(evaluate_figures(count, Path(work), families))
            print(json.dumps(figures["evaluate"][-1]), flush=True)
    stem = "store_scale_quick" if options.quick else "store_scale"
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / f"{stem}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (options.out / f"{stem}.md").write_text(markdown(figures))
    print(markdown(figures))


if __name__ == "__main__":
    main()
