"""The benchmark scripts run end to end at smoke sizes and write the figures they report."""

import importlib
import json
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, arguments, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *map(str, arguments)])
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    runpy.run_path(str(BENCHMARKS / name), run_name="__main__")


def test_metrics_speed_writes_both_implementations_and_per_percentage_figures(tmp_path, monkeypatch):
    pytest.importorskip("pytorch_grad_cam")
    run_script("metrics_speed.py", ["--images", 2, "--size", 32, "--threads", 1, "--out", tmp_path], monkeypatch)
    figures = json.loads((tmp_path / "metrics_speed_cpu_1threads.json").read_text())
    assert sorted(int(p) for p in figures["speedup_imputation_by_percentage"]) == list(range(10, 100, 10))
    for side in ("ours_cpu", "grad_cam_cpu"):
        assert figures[side]["seconds"] > 0 and figures[side]["images_per_second"] > 0
    # both solve the same system: the curves differ by about the N(0, 0.01) noise, not more
    assert (
        figures["grad_cam_vs_ours_mean_abs_logit_difference"]
        < 5 * figures["noise_floor_mean_abs_logit_difference"] + 1e-3
    )
    assert len(figures["mean_curve_ours"]) == len(figures["mean_curve_grad_cam"]) == 9


def test_fame_speed_quick_run_reports_every_gpu_section(tmp_path, monkeypatch):
    sections = ["resnet50", "trained", "verification", "feature_map"]
    run_script("fame_speed.py", ["--quick", "--sections", *sections, "--out", tmp_path], monkeypatch)
    figures = json.loads(next(tmp_path.glob("fame_speed_quick_*.json")).read_text())
    assert next(tmp_path.glob("fame_speed_quick_*.md")).read_text().strip()
    for section in sections:
        rows = figures["sections"][section]["rows"]
        assert len(rows) >= 2, section  # float32 and at least one other setting
        reference = rows[0]
        assert reference["setting"] == "32"
        assert reference["spearman_median"] == 1.0 and reference["max_abs_difference"] == 0.0
        assert all(0 <= row["spearman_p5"] <= row["spearman_median"] <= 1 for row in rows)


def test_the_fastest_setting_is_named_only_with_agreement_on_both_networks(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    fame_speed = importlib.import_module("fame_speed")
    report = fame_speed.Report(tmp_path, torch.device("cpu"), SimpleNamespace(quick=True, iterations=3))
    agreeing = {"spearman_median": 0.999, "spearman_p5": 0.99}
    resnet50 = [
        {"setting": name, "images_per_s": speed, **agreeing}
        for name, speed in (("32", 1.0), ("bf16-mixed", 3.0), ("bf16-mixed + compile", 5.0))
    ]
    trained = [{"setting": name, **agreeing} for name in ("32", "bf16-mixed")]
    report.figures["sections"] = {
        "resnet50": {"description": "", "rows": resnet50},
        "trained": {"description": "", "rows": trained},
    }
    assert report.fastest_meeting_bar() == {"setting": "bf16-mixed", "images_per_s": 3.0}
    assert report.faster_checked_on_resnet50_only() == {"setting": "bf16-mixed + compile", "images_per_s": 5.0}
    report.write()
    assert "not run on the trained ResNet-18: bf16-mixed + compile" in report.markdown_path.read_text()
    trained[1]["spearman_p5"] = 0.9  # bf16 misses the bar on the trained network
    assert report.fastest_meeting_bar()["setting"] == "32"
    del report.figures["sections"]["trained"]  # no evidence on the trained network: nothing is named
    assert report.fastest_meeting_bar() is None


def test_store_scale_quick_run_reports_every_figure(tmp_path, monkeypatch):
    run_script("store_scale.py", ["--quick", "--threads", 1, "--work", tmp_path, "--out", tmp_path], monkeypatch)
    figures = json.loads((tmp_path / "store_scale_quick.json").read_text())
    assert "| 640 | 32 |" in (tmp_path / "store_scale_quick.md").read_text()
    assert [row["rows"] for row in figures["scale"]] == [64, 640]
    for row in figures["scale"]:
        assert row["write_maps_per_s"] > 0 and row["read_maps_per_s"] > 0 and row["batch_read_median_s"] > 0
        assert 0 < row["bytes_per_map"] < row["raw_bytes_per_map"]  # compressed
    assert figures["scale"][1]["files_per_map"] <= 0.01  # segment and index files, not one per map
    (evaluated,) = figures["evaluate"]
    assert evaluated["rows"] == 40 and evaluated["scores"] > 0
    assert 0 < evaluated["store_seconds"] < evaluated["seconds"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["store_scale_quick.json", "store_scale_quick.md"]


@pytest.mark.slow  # 106 s on the shared 2-core machine (ROAD imputation, descents); make test-all runs it
def test_anytime_run_scores_the_grid_and_a_stopping_rule(tmp_path, monkeypatch, capsys):
    arguments = ["--images", 2, "--grid", 2, 4, "--rules", "flip+0", "--threads", 1, "--out", tmp_path]
    run_script("anytime.py", arguments, monkeypatch)
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["metric"] == "deletion_auc" and len(line["advantage_ci"]) == 2
    assert 0 < line["iteration_fraction"] <= 1
    figures = json.loads((tmp_path / "anytime.json").read_text())
    settings = [row["setting"] for row in figures["rows"]]
    assert settings == ["T=2", "T=4", "flip+10", "flip+0"]  # the candidate rule always runs
    reference = figures["rows"][1]
    assert reference["agreement_500"] == pytest.approx(1.0) and reference["deletion_auc_advantage_ci"] == [0.0, 0.0]
    for row in figures["rows"]:
        assert {"road_gap", "pointing_game", "relevance_mass"} <= set(row)
        assert row["mean_iterations"] <= 4
    assert (tmp_path / "anytime.png").stat().st_size > 0 and "| flip+10 |" in (tmp_path / "anytime.md").read_text()
