"""Reports: bootstrap summaries, the paper-shaped tables, curve and sweep plots, the sweep folder reader."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fame.report import (
    SCORE_COLUMNS,
    Column,
    bootstrap_counts,
    curve_areas,
    markdown_table,
    plot_curves,
    plot_sweep,
    summarize,
    sweep_table,
)
from fame.sweeps import read_sweep

LEVELS = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def scores(methods=("fame", "gradcam"), samples=40, seed=0):
    """A long score table with scalar metrics (IoU, verification AUC) and ROAD / deletion curves."""
    rng = np.random.default_rng(seed)
    rows = []
    for offset, method in enumerate(methods):
        for s in range(samples):
            sid = f"id-{s:03d}"
            for metric in ("iou_30", "iou_50", "pointing_game"):
                rows.append((method, metric, np.nan, rng.uniform(0.2, 0.6) + 0.1 * offset, sid))
            for order in ("morf", "lerf"):
                for imputation in ("zero", "linear"):
                    slope = 0.05 if order == "morf" else 0.01
                    for level in LEVELS:
                        rows.append(
                            (
                                method,
                                f"road_{order}_{imputation}_logit_drop",
                                float(level),
                                slope * level + rng.normal(0, 0.1),
                                sid,
                            )
                        )
            for level in LEVELS:
                rows.append((method, "deletion", level / 100, 1 - level / 100, sid))
            rows.append((method, "deletion_auc", np.nan, 0.5, sid))
    return pd.DataFrame(rows, columns=["method", "metric", "level", "value", "sample_id"])


def test_summary_mean_and_interval_match_a_literal_bootstrap():
    frame = scores(samples=30)
    summary = summarize(frame, resamples=500, seed=3)
    row = summary[(summary.method == "fame") & (summary.metric == "iou_30")].iloc[0]
    values = frame[(frame.method == "fame") & (frame.metric == "iou_30")].sort_values("sample_id")["value"].to_numpy()
    assert row.n == 30 and row["mean"] == pytest.approx(values.mean())
    # literal resampling with the same draws: index sets -> means -> quantiles
    generator = np.random.default_rng([3, 30])
    draws = generator.integers(0, 30, size=(500, 30))
    means = values[draws].mean(axis=1)
    assert row.low == pytest.approx(np.quantile(means, 0.025))
    assert row.high == pytest.approx(np.quantile(means, 0.975))
    assert row.low < row["mean"] < row.high


def test_summary_is_seeded_and_independent_of_row_order():
    frame = scores()
    first = summarize(frame, seed=1)
    shuffled = summarize(frame.sample(frac=1.0, random_state=7), seed=1)
    pd.testing.assert_frame_equal(first, shuffled)
    other = summarize(frame, seed=2)
    assert not np.allclose(first["low"], other["low"])


def test_summary_covers_levels_scalars_and_derived_curve_areas():
    summary = summarize(scores(), resamples=200)
    road = summary[(summary.metric == "road_morf_zero_logit_drop") & (summary.method == "fame")]
    assert road["level"].tolist() == [float(level) for level in LEVELS]
    scalar = summary[summary.metric == "iou_50"]
    assert scalar["level"].isna().all() and len(scalar) == 2
    area = summary[(summary.metric == "road_morf_zero_logit_drop_auc") & (summary.method == "fame")].iloc[0]
    assert area["mean"] == pytest.approx(0.05 * 50, abs=0.05)  # mean drop of a linear ramp 0..5
    # deletion_auc was written by the stage: kept as it is, not derived a second time
    assert (summary.metric == "deletion_auc").sum() == 2
    assert summary[summary.metric == "deletion_auc"]["mean"].tolist() == [0.5, 0.5]


def test_curve_areas_are_the_normalized_trapezoid():
    frame = pd.DataFrame(
        {
            "method": "m",
            "metric": "c",
            "level": [0.0, 0.5, 1.0, 0.0, 0.5, 1.0],
            "value": [0.0, 1.0, 0.0, 1.0, 1.0, 1.0],
            "sample_id": ["a", "a", "a", "b", "b", "b"],
        }
    )
    areas = curve_areas(frame).set_index("sample_id")["value"]
    assert areas["a"] == pytest.approx(0.5) and areas["b"] == pytest.approx(1.0)


def test_summary_drops_non_finite_values_and_reads_empty_levels():
    frame = pd.DataFrame(
        {"method": "m", "metric": "x", "level": ["", "", ""], "value": [1.0, np.nan, 3.0], "sample_id": [1, 2, 3]}
    )
    summary = summarize(frame, resamples=50)
    assert summary["n"].tolist() == [2] and summary["mean"].tolist() == [2.0]
    with pytest.raises(ValueError, match="sample_id"):
        summarize(frame.drop(columns="sample_id"))


def test_bootstrap_counts_draw_n_samples_per_resample():
    counts = bootstrap_counts(17, 64, seed=0)
    assert counts.shape == (64, 17)
    assert (counts.sum(axis=1) == 17).all()


def test_summary_of_ten_thousand_samples_and_twenty_metrics_runs():
    rng = np.random.default_rng(0)
    samples, metrics = 10_000, 20
    frame = pd.DataFrame(
        {
            "method": "fame",
            "metric": np.repeat([f"metric_{k}" for k in range(metrics)], samples),
            "level": np.nan,
            "value": rng.normal(size=samples * metrics),
            "sample_id": np.tile([f"s{i}" for i in range(samples)], metrics),
        }
    )
    summary = summarize(frame, resamples=1000)
    assert len(summary) == metrics and (summary["n"] == samples).all()
    assert ((summary["high"] - summary["low"]) < 0.06).all()  # ~ 2 * 1.96 / sqrt(10000)


def test_tables_name_the_deletion_and_sanity_protocols():
    rows = [
        ("fame", metric, np.nan, value, f"s{i}")
        for i in range(4)
        for metric, value in (
            ("deletion_rise_auc", 0.2),
            ("insertion_rise_auc", 0.7),
            ("deletion_auc", 0.3),
            ("sanity_spearman_auc", 0.1),
            ("sanity_redraw_ssim_auc", 0.4),
        )
    ]
    table = markdown_table(summarize(pd.DataFrame(rows, columns=list(SCORE_COLUMNS)), resamples=20))
    header = next(line for line in table.splitlines() if line.startswith("| method | Deletion"))
    assert header.split(" | ")[1:] == [
        "Deletion AUC ×100 (FAME protocol)",
        "Deletion AUC ×100 (RISE protocol)",
        "Insertion AUC ×100 (RISE protocol) |",
    ]
    assert "| fame | 30.0 [30.0, 30.0] | 20.0 [20.0, 20.0] | 70.0 [70.0, 70.0] |" in table
    assert "sanity Spearman, layers re-initialised (area over the cascade)" in table
    assert "sanity SSIM, layers redrawn from their own mean / std (area over the cascade)" in table


def test_markdown_table_is_shaped_like_the_paper_with_notes():
    summary = summarize(scores(), resamples=200)
    table = markdown_table(summary, missing_methods=["rise"], excluded={"fame": 4, "gradcam": 0})
    assert "### Localisation and faithfulness (paper Tab. 1)" in table
    header = next(line for line in table.splitlines() if line.startswith("| method | IoU"))
    assert "IoU@0.3 ×100" in header and "IoU@0.5 ×100" in header and "IoU@0.7" not in header  # absent: left out
    assert "ROAD MoRF zero" in header and "ROAD LeRF linear" in header and "Deletion AUC ×100 (FAME protocol)" in header
    assert "RISE protocol" not in header  # no deletion_rise rows: no RISE columns
    fame_row = next(line for line in table.splitlines() if line.startswith("| fame |"))
    row = summary[(summary.method == "fame") & (summary.metric == "iou_30")].iloc[0]
    assert f"{100 * row['mean']:.1f} [{100 * row.low:.1f}, {100 * row.high:.1f}]" in fame_row
    assert "### Other metrics" in table and "pointing game (0 px)" in table  # labelled with its tolerance
    assert "Missing from the store (not scored): rise." in table
    assert "fame: 4" in table and "gradcam: 0" not in table


def test_markdown_table_with_chosen_columns_and_verification_preset():
    frame = pd.DataFrame(
        {
            "method": ["fame", "corrrise"] * 2,
            "metric": ["verification_deletion_auc"] * 2 + ["verification_insertion_auc"] * 2,
            "level": np.nan,
            "value": [20.0, 30.0, 80.0, 70.0],
            "sample_id": "pair-0",
        }
    )
    summary = summarize(frame, resamples=10)
    table = markdown_table(summary)
    assert "### Face verification (paper Tab. 2)" in table
    assert "| fame | 20.0 [20.0, 20.0] | 80.0 [80.0, 80.0] |" in table
    chosen = markdown_table(
        summarize(scores(), resamples=50),
        [Column("drop @50%", "road_morf_zero_logit_drop", 50.0), ("deletion", 0.5), "iou_30"],
        methods=["gradcam"],
    )
    assert chosen.splitlines()[0] == "| method | drop @50% | deletion@0.5 | iou_30 |"
    assert "| gradcam | " in chosen and "| fame |" not in chosen


def test_curve_plot_writes_a_png(tmp_path):
    summary = summarize(scores(), resamples=50)
    path = plot_curves(summary, "road_morf", tmp_path / "road.png")
    with Image.open(path) as image:
        assert image.size[0] > 400  # two panels side by side
    with pytest.raises(ValueError, match="no curve metric"):
        plot_curves(summary, "iou", tmp_path / "none.png")


def test_sweep_table_and_plot(tmp_path):
    frames = {100: scores(seed=2), 25: scores(seed=0), 50: scores(seed=1)}
    table = sweep_table(frames, "fame.iterations", resamples=50)
    assert list(dict.fromkeys(table["fame.iterations"])) == [25, 50, 100]  # numeric order
    assert {"fame.iterations", "method", "metric", "level", "mean", "low", "high"} <= set(table.columns)
    path = plot_sweep(
        table, "fame.iterations", tmp_path / "sweep.png", metrics=["iou_30", "road_morf_zero_logit_drop_auc"]
    )
    assert path.is_file()
    labelled = sweep_table(
        {"explainer.iterations=50": scores(seed=1), "explainer.iterations=5": scores(seed=0)}, "setting", resamples=20
    )
    assert list(dict.fromkeys(labelled["setting"])) == ["explainer.iterations=5", "explainer.iterations=50"]
    assert plot_sweep(labelled, "setting", tmp_path / "labelled.png", metrics=["iou_30"]).is_file()
    with pytest.raises(ValueError, match="no scalar metric"):
        plot_sweep(table, "fame.iterations", tmp_path / "x.png", metrics=["nonexistent"])


def _job(sweep, name, overrides):
    """A job folder as Hydra's multirun writes it: .hydra/overrides.yaml (and config.yaml, never read)."""
    files = sweep / name / ".hydra"
    files.mkdir(parents=True)
    (files / "overrides.yaml").write_text("".join(f"- {override}\n" for override in overrides))
    (files / "config.yaml").write_text("store: !!python/object/apply:os.system [echo never]\n")


def test_a_sweep_folder_is_read_as_data_in_job_order(tmp_path):
    sweep = tmp_path / "multirun"
    for number in (10, 2, 0):  # numbered as Hydra numbers jobs, read numerically
        _job(
            sweep,
            str(number),
            [
                "explainer=[fame]",
                f"explainer.fame.iterations={5 * number}",
                "explainer.fame.step_size=0.5",
                "note=${oc.env:HOME}",
            ],
        )
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    entries = read_sweep(sweep)
    assert [entry["store"] for entry in entries] == [str(sweep / n / "maps.zarr") for n in ("0", "2", "10")]
    assert entries[1]["overrides"] == {
        "explainer": "[fame]",
        "explainer.fame.iterations": 10,  # numbers again
        "explainer.fame.step_size": 0.5,
        "note": "${oc.env:HOME}",
    }  # never resolved


def test_a_sweep_folder_that_is_not_plain_data_is_refused(tmp_path):
    _job(tmp_path, "0", ["a=1"])
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("!!python/object/apply:os.system [echo no]\n")
    with pytest.raises(ValueError, match="is not YAML"):
        read_sweep(tmp_path)
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("{a: 1}\n")
    with pytest.raises(ValueError, match="should list Hydra overrides as strings"):
        read_sweep(tmp_path)
    with pytest.raises(FileNotFoundError, match="explain.py -m"):
        read_sweep(tmp_path / "absent")
