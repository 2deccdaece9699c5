"""Anytime FAME: faithfulness per unit of compute, for fixed T and for the stopping rules (README, "Anytime FAME").

On the ResNet-18 trained on the shapes data at 112 px (``benchmarks/checkpoints/resnet18_shapes112.pt``,
``train_agreement_model.py``), held-out images, each explained for its predicted class with the
paper's settings (step 1/255, logit loss, no epsilon, blur 49 / 7.7 scaled to 112 px):

- fixed T on a grid of iterations: one 500-step descent, its x_t read off at each T (the descent
  is Markov, so the T-step run is the first T steps of the 500-step one);
- the stopping rules of ``FameConfig.stop`` (docs/method.md#stopping), each run for real.

Per map: deletion AUC (black substrate, 11 levels; lower is better), the ROAD MoRF-LeRF gap of the
target probability (noisy linear imputation, 10..90 %; higher is better), pointing game and
relevance mass on the object masks, and the Spearman correlation with the 500-step map. Each
setting is compared with the paper's 500 steps on the same images with a paired bootstrap
(``fame.report.statistics.bootstrap_counts``): the 95 % interval of the mean per-image advantage,
oriented so that higher is better for the setting.

    python benchmarks/anytime.py --quick   # 24 images, the grid (free: read off the 500-step descent) and the
                                           # candidate rule, deletion AUC and agreement only: one JSON line on
                                           # stdout, the table in benchmarks/results/anytime_quick.{json,md}
    python benchmarks/anytime.py           # 64 images, every rule and metric; writes
                                           # benchmarks/results/anytime.{json,md,png}

A 500-step descent of one 112 px image costs about 10 s on 2 idle CPU cores and several times that
on a loaded machine; ``--images`` and ``--rules`` shorten a run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_agreement_model import (  # noqa: E402
    CHECKPOINT,
    CLASSES,
    IMAGE_SIZE,
    TEST_SEED,
    load_agreement_model,
    shapes_batch,
)

from fame import FameConfig, explain_classification  # noqa: E402
from fame.data import ShapesDataset  # noqa: E402
from fame.explain.engine import attribution_map, lots_perturbation, rank_correlation  # noqa: E402
from fame.explain.guard import explaining  # noqa: E402
from fame.explain.objectives import ClassLogit  # noqa: E402
from fame.metrics.faithfulness import DEFAULT_FRACTIONS, curve_auc, deletion_curve  # noqa: E402
from fame.metrics.localization import pointing_game, relevance_mass_accuracy  # noqa: E402
from fame.metrics.road import road_curve  # noqa: E402
from fame.report.statistics import bootstrap_counts  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PAPER_T = 500
GRID = (10, 25, 50, 100, 200, 300, 500)
#: The stopping rules compared; CANDIDATE is the one ``--quick`` reports.
RULES = {
    "flip+0": {"stop": "flip", "stop_after": 0},
    "flip+10": {"stop": "flip", "stop_after": 10},
    "flip+25": {"stop": "flip", "stop_after": 25},
    "settled-0.95": {"stop": "settled", "settle_every": 10, "settle_tolerance": 0.95, "settle_size": 16},
    "settled-0.99": {"stop": "settled", "settle_every": 10, "settle_tolerance": 0.99, "settle_size": 16},
}
CANDIDATE = "flip+10"
ROAD_PERCENTAGES = tuple(range(10, 100, 10))
#: Orientation of each metric: +1 where higher is better, -1 where lower is.
METRICS = {"deletion_auc": -1, "road_gap": 1, "pointing_game": 1, "relevance_mass": 1, "agreement_500": 1}
BATCH = 16


def object_masks(count: int) -> torch.Tensor:
    """The object masks (count, 1, H, W) of the held-out images ``shapes_batch`` returns."""
    dataset = ShapesDataset(count, image_size=IMAGE_SIZE, seed=TEST_SEED, num_classes=CLASSES)
    return torch.stack([dataset[i]["mask"] for i in range(count)])


def paper_config() -> FameConfig:
    """The paper's settings at 112 px: blur 49 / 7.7 scaled by 112 / 224, all T steps."""
    return FameConfig(iterations=PAPER_T, epsilon=None, blur_kernel=25, blur_sigma=7.7 * IMAGE_SIZE / 224)


def fixed_grid_maps(model, images, targets, config: FameConfig, grid) -> dict:
    """{T: maps} of fixed-T FAME for every T in ``grid``, from one descent continued segment by segment."""
    maps = {steps: [] for steps in grid}
    for start in range(0, images.shape[0], BATCH):
        chunk, chunk_targets = images[start : start + BATCH], targets[start : start + BATCH]
        current, done = chunk.clone(), 0
        with explaining(model):
            objective = ClassLogit(model, chunk_targets)
            for steps in grid:
                current = lots_perturbation(objective, current, config.replace(iterations=steps - done)).perturbed
                done = steps
                maps[steps].append(attribution_map(chunk, current, config))
    return {steps: torch.cat(parts) for steps, parts in maps.items()}


def rule_maps(model, images, targets, config: FameConfig):
    """Maps and per-image iterations of a stopping rule."""
    maps, iterations = [], []
    for start in range(0, images.shape[0], BATCH):
        chunk_maps, stats = explain_classification(
            model, images[start : start + BATCH], targets[start : start + BATCH], config, return_stats=True
        )
        maps.append(chunk_maps)
        iterations.append(stats.iterations)
    return torch.cat(maps), torch.cat(iterations)


def scores(model, images, targets, masks, maps, reference, full: bool) -> dict:
    """Per-image metrics of ``maps`` (numpy arrays of shape (B,))."""
    deletion = deletion_curve(model, images, maps, targets, batch_size=64)
    values = {
        "deletion_auc": curve_auc(deletion, DEFAULT_FRACTIONS),
        "agreement_500": rank_correlation(maps.flatten(1), reference.flatten(1)),
    }
    if full:
        noise_seeds = torch.arange(images.shape[0])
        morf, lerf = (
            road_curve(
                model,
                images,
                maps,
                targets,
                ROAD_PERCENTAGES,
                most_relevant_first=first,
                noise_seeds=noise_seeds,
                batch_size=64,
            ).probability.mean(dim=1)
            for first in (True, False)
        )
        values["road_gap"] = lerf - morf
        values["pointing_game"] = pointing_game(maps, masks)
        values["relevance_mass"] = relevance_mass_accuracy(maps, masks)
    return {name: value.double().cpu().numpy() for name, value in values.items()}


def paired_interval(advantage: np.ndarray, resamples: int = 2000, seed: int = 0) -> list:
    """95 % percentile-bootstrap interval of the mean of per-image differences."""
    counts = bootstrap_counts(advantage.size, resamples, seed)
    means = counts @ advantage / advantage.size
    return [float(v) for v in np.quantile(means, [0.025, 0.975])]


def mean_interval(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> list:
    counts = bootstrap_counts(values.size, resamples, seed)
    return [float(v) for v in np.quantile(counts @ values / values.size, [0.025, 0.975])]


def summarize(name: str, iterations: np.ndarray, values: dict, paper: dict, paper_iterations: int) -> dict:
    row = {
        "setting": name,
        "mean_iterations": float(iterations.mean()),
        "iteration_fraction": float(iterations.mean()) / paper_iterations,
    }
    for metric, values_of_metric in values.items():
        advantage = METRICS[metric] * (values_of_metric - paper[metric])
        row[metric] = float(values_of_metric.mean())
        row[f"{metric}_ci"] = mean_interval(values_of_metric)
        row[f"{metric}_advantage"] = float(advantage.mean())
        row[f"{metric}_advantage_ci"] = paired_interval(advantage)
    return row


def markdown(rows: list, meta: dict) -> str:
    metrics = [m for m in METRICS if m in rows[0]]
    header = (
        "| setting | mean iterations | "
        + " | ".join(f"{m} (advantage vs the largest T, 95 % CI)" for m in metrics)
        + " |"
    )
    lines = [
        f"Anytime FAME on {meta['description']}; {meta['images']} held-out images; "
        f"advantage oriented so that > 0 favours the setting (paired bootstrap, {meta['resamples']} resamples).",
        "",
        header,
        "|" + "---|" * (2 + len(metrics)),
    ]
    for row in rows:
        cells = [
            f"{row[m]:.3f} ({row[f'{m}_advantage']:+.3f} [{row[f'{m}_advantage_ci'][0]:+.3f}, "
            f"{row[f'{m}_advantage_ci'][1]:+.3f}])"
            for m in metrics
        ]
        lines.append(f"| {row['setting']} | {row['mean_iterations']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if m in rows[0]]
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2))
    fixed = [row for row in rows if row["setting"].startswith("T=")]
    rules = [row for row in rows if not row["setting"].startswith("T=")]
    for axis, metric in zip(np.atleast_1d(axes), metrics):
        x = [row["mean_iterations"] for row in fixed]
        axis.plot(x, [row[metric] for row in fixed], "o-", color="black", label="fixed T")
        axis.fill_between(
            x,
            [row[f"{metric}_ci"][0] for row in fixed],
            [row[f"{metric}_ci"][1] for row in fixed],
            color="gray",
            alpha=0.25,
        )
        for row in rules:
            axis.errorbar(
                row["mean_iterations"],
                row[metric],
                yerr=[[row[metric] - row[f"{metric}_ci"][0]], [row[f"{metric}_ci"][1] - row[metric]]],
                fmt="s",
                label=row["setting"],
            )
        axis.set_xscale("log")
        axis.set_xlabel("mean iterations per image")
        axis.set_title(metric.replace("_", " ") + (" (lower better)" if METRICS[metric] < 0 else ""))
    np.atleast_1d(axes)[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="24 images, the candidate rule only; one JSON line")
    parser.add_argument("--images", type=int, default=None, help="held-out images (24 quick, 64 full)")
    parser.add_argument(
        "--rules",
        nargs="+",
        choices=sorted(RULES),
        default=None,
        help=f"stopping rules to run (quick: {CANDIDATE}; full: all)",
    )
    parser.add_argument(
        "--grid",
        type=int,
        nargs="+",
        default=GRID,
        help="fixed iterations T compared; the largest is the reference (the paper's 500)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    count = args.images or (24 if args.quick else 64)
    started = time.perf_counter()
    model = load_agreement_model(CHECKPOINT)
    images, _ = shapes_batch(count, TEST_SEED)
    masks = object_masks(count)
    with torch.no_grad():
        targets = torch.cat([model(images[i : i + 64]).argmax(1) for i in range(0, count, 64)])
    config = paper_config()
    grid = tuple(sorted(set(args.grid)))
    config = config.replace(iterations=grid[-1])
    fixed = fixed_grid_maps(model, images, targets, config, grid)
    reference = fixed[grid[-1]]
    chosen = args.rules or ([CANDIDATE] if args.quick else list(RULES))
    rules = {name: RULES[name] for name in dict.fromkeys([CANDIDATE, *chosen])}
    settings = {f"T={steps}": (fixed[steps], np.full(count, steps)) for steps in grid}
    for name, changes in rules.items():
        maps, iterations = rule_maps(model, images, targets, config.replace(**changes))
        settings[name] = (maps, iterations.numpy())
    values = {
        name: scores(model, images, targets, masks, maps, reference, not args.quick)
        for name, (maps, _) in settings.items()
    }
    paper = values[f"T={grid[-1]}"]
    rows = [summarize(name, iterations, values[name], paper, grid[-1]) for name, (_, iterations) in settings.items()]
    candidate = next(row for row in rows if row["setting"] == CANDIDATE)
    line = {
        "metric": "deletion_auc",
        "advantage_ci": candidate["deletion_auc_advantage_ci"],
        "iteration_fraction": candidate["iteration_fraction"],
    }
    meta = {
        "description": f"the ResNet-18 trained on shapes ({IMAGE_SIZE} px), predicted class, paper settings",
        "images": count,
        "resamples": 2000,
        "seconds": time.perf_counter() - started,
        "candidate": line,
        "rules": rules,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "anytime_quick" if args.quick else "anytime"
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(rows, meta))
    print(json.dumps(line))
    if not args.quick:
        plot(rows, args.out / f"{stem}.png")
        print(markdown(rows, meta))


if __name__ == "__main__":
    main()
