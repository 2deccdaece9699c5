"""The benchmark scripts run end to end at smoke sizes and write the figures they report."""

import json
import runpy
import sys
from pathlib import Path

import pytest

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
    assert figures["grad_cam_vs_ours_mean_abs_logit_difference"] < 5 * figures["noise_floor_mean_abs_logit_difference"] + 1e-3
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
