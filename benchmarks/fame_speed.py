"""Speed and exactness of the FAME engine per precision, memory format and compilation (issue 9).

    python benchmarks/fame_speed.py --sections resnet50 trained verification feature_map   # on a GPU, ~5 min
    python benchmarks/fame_speed.py --quick         # CPU smoke run: small sizes, a few iterations
    python benchmarks/fame_speed.py --sections cpu_ratio

Sections (``--sections``, default all):

- ``resnet50``: torchvision ResNet-50, random weights, 224 px, 500 iterations, no early stop;
  per setting images/s, peak GPU memory and agreement with the float32 maps of the same images
  (per-map Spearman rank correlation: median and 5th percentile; max absolute difference).
- ``trained``: the same on the ResNet-18 trained on the shapes data at 112 px
  (``benchmarks/train_agreement_model.py``; its checkpoint travels with the tree).
- ``verification``: IResNet-100 at 112 px, random weights, e+ and e- of one side of each pair,
  epsilon 0.01: pairs/s, mean iterations and agreement per precision.
- ``feature_map``: the 49-location sheet of ResNet-50 ``layer4`` at 224 px in float32 and in
  the fastest setting.
- ``cpu_ratio`` (meant for a 2-core machine; the GPU suite leaves it out): on 2 CPU threads, ResNet-18 at
  112 px, 20 iterations, batch 8: the batched engine against a loop over single images, with the
  agreement of their maps.

Everything is written as it is measured to ``<out>/fame_speed_<tag>.json`` and ``.md`` (``--out``,
default ``benchmarks/results``) with the device name, torch, CUDA and cuDNN versions; the fastest
setting that meets the agreement bar (median Spearman >= 0.99, 5th percentile >= 0.97 on both
networks) is named at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))

from fame import FameConfig, explain_classification, explain_feature_map, explain_verification  # noqa: E402
from fame.explain.precision import map_agreement  # noqa: E402

#: (precision, channels_last, compile); the first is the reference every other is compared with.
GPU_SETTINGS = [
    ("32", False, False),
    ("tf32", False, False),
    ("tf32", True, False),
    ("bf16-mixed", False, False),
    ("bf16-mixed", True, False),
    ("16-mixed", True, False),
    ("bf16-mixed", True, True),
]
CPU_SETTINGS = [("32", False, False), ("bf16-mixed", False, False), ("bf16-mixed", True, False)]
VERIFICATION_PRECISIONS = [("32", False), ("tf32", True), ("bf16-mixed", True), ("16-mixed", True)]
AGREEMENT_BAR = {"median": 0.99, "p5": 0.97}
SECTIONS = ("resnet50", "trained", "verification", "feature_map", "cpu_ratio")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function, device: torch.device):
    """(seconds, result, peak GiB or None) of one call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, result, peak


def scaled_blur(size: int) -> dict:
    """The paper's blur (49, 7.7 at 224 px) scaled to ``size``."""
    return {"blur_kernel": max(3, round(49 * size / 224)) | 1, "blur_sigma": 7.7 * size / 224}


def setting_name(precision: str, channels_last: bool, compiled: bool) -> str:
    return precision + (" + channels-last" if channels_last else "") + (" + compile" if compiled else "")


def agreement_figures(maps: torch.Tensor, reference: torch.Tensor) -> dict:
    agreement = map_agreement(maps, reference)
    spearman = agreement["spearman"]
    return {
        "spearman_median": float(spearman.quantile(0.5)),
        "spearman_p5": float(spearman.quantile(0.05)),
        "max_abs_difference": float(agreement["max_abs_difference"].max()),
    }


def meets_bar(row: dict) -> bool:
    return row.get("spearman_median", 0) >= AGREEMENT_BAR["median"] and row.get("spearman_p5", 0) >= AGREEMENT_BAR["p5"]


class Report:
    """Collects the figures and rewrites the JSON and markdown files after every row."""

    def __init__(self, out: Path, device: torch.device, args):
        self.device = device
        cuda = device.type == "cuda"
        name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
        tag = ("quick_" if args.quick else "") + ("".join(c if c.isalnum() else "_" for c in name).strip("_") or "cpu")
        self.json_path = out / f"fame_speed_{tag}.json"
        self.markdown_path = out / f"fame_speed_{tag}.md"
        out.mkdir(parents=True, exist_ok=True)
        self.figures = {
            "device": str(device),
            "device_name": name,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
            "quick": args.quick,
            "iterations": args.iterations,
            "agreement_bar": AGREEMENT_BAR,
            "sections": {},
        }

    def section(self, name: str, description: str) -> list:
        self.figures["sections"][name] = {"description": description, "rows": []}
        print(f"\n## {name}: {description}", flush=True)
        return self.figures["sections"][name]["rows"]

    def add(self, rows: list, row: dict) -> None:
        rows.append(row)
        print(
            "  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True
        )
        self.write()

    def write(self) -> None:
        """Both files, each replaced in one step: a run cut short leaves the last complete ones."""
        self.figures["fastest_meeting_bar"] = self.fastest_meeting_bar()
        self.figures["faster_checked_on_resnet50_only"] = self.faster_checked_on_resnet50_only()
        for path, text in ((self.json_path, json.dumps(self.figures, indent=2)), (self.markdown_path, self.markdown())):
            partial = path.with_name(path.name + ".partial")
            partial.write_text(text)
            partial.replace(path)

    def _resnet50_rows_meeting_bar(self) -> list:
        rows = self.figures["sections"].get("resnet50", {}).get("rows", [])
        return [row for row in rows if "images_per_s" in row and meets_bar(row)]

    def _trained_rows(self) -> dict:
        return {row["setting"]: row for row in self.figures["sections"].get("trained", {}).get("rows", [])}

    @staticmethod
    def _fastest(rows: list):
        if not rows:
            return None
        best = max(rows, key=lambda row: row["images_per_s"])
        return {"setting": best["setting"], "images_per_s": best["images_per_s"]}

    def fastest_meeting_bar(self):
        """The fastest ResNet-50 setting whose maps meet the bar on ResNet-50 and on the trained
        ResNet-18; a setting without a trained-network row has no evidence there and is not named."""
        trained = self._trained_rows()
        return self._fastest(
            [
                row
                for row in self._resnet50_rows_meeting_bar()
                if row["setting"] in trained and meets_bar(trained[row["setting"]])
            ]
        )

    def faster_checked_on_resnet50_only(self):
        """The fastest setting quicker than ``fastest_meeting_bar`` that meets the bar on ResNet-50 but
        was not run on the trained network (the compiled one is measured on ResNet-50 only), or None."""
        trained, best = self._trained_rows(), self.fastest_meeting_bar()
        return self._fastest(
            [
                row
                for row in self._resnet50_rows_meeting_bar()
                if row["setting"] not in trained and (best is None or row["images_per_s"] > best["images_per_s"])
            ]
        )

    def markdown(self) -> str:
        f = self.figures
        lines = [
            f"# FAME speed on {f['device_name']}",
            "",
            f"torch {f['torch']}, CUDA {f['cuda']}, cuDNN {f['cudnn']}, torchvision {f['torchvision']}, "
            f"Python {f['python']}{' (quick mode)' if f['quick'] else ''}. Agreement: per-map Spearman against "
            f"the float32 maps of the same images; bar: median >= {AGREEMENT_BAR['median']}, "
            f"5th percentile >= {AGREEMENT_BAR['p5']}.",
            "",
        ]
        for name, section in f["sections"].items():
            rows = section["rows"]
            lines += [f"## {name}", "", section["description"], ""]
            if not rows:
                continue
            keys = list(dict.fromkeys(key for row in rows for key in row))
            lines.append("| " + " | ".join(keys) + " |")
            lines.append("|" + "---|" * len(keys))
            for row in rows:
                cells = [f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        best = f.get("fastest_meeting_bar")
        if best:
            lines.append(
                f"Fastest setting meeting the agreement bar on both networks (ResNet-50 and the trained "
                f"ResNet-18): **{best['setting']}** ({best['images_per_s']:.1f} images/s on ResNet-50)."
            )
        unchecked = f.get("faster_checked_on_resnet50_only")
        if unchecked:
            lines.append(
                f"Faster, meeting the bar on ResNet-50 but not run on the trained ResNet-18: "
                f"{unchecked['setting']} ({unchecked['images_per_s']:.1f} images/s)."
            )
        return "\n".join(lines) + "\n"


def compare_settings(
    report: Report, rows: list, model, images, targets, base: FameConfig, settings, batch: int, reference=None
):
    """Time every setting on the same images; agreement against ``reference`` maps, by default the
    first (float32) setting's."""
    device = images.device
    for precision, channels_last, compiled in settings:
        config = base.replace(precision=precision, channels_last=channels_last, compile=compiled)
        name = setting_name(precision, channels_last, compiled)
        try:
            warm_start = time.perf_counter()
            explain_classification(model, images[:batch], targets[:batch], config.replace(iterations=2))
            synchronize(device)
            warm_up = time.perf_counter() - warm_start

            def run(config=config):
                return torch.cat(
                    [
                        explain_classification(model, images[i : i + batch], targets[i : i + batch], config)
                        for i in range(0, len(images), batch)
                    ]
                )

            seconds, maps, peak = timed(run, device)
        except Exception as error:  # a setting that fails is a result too
            traceback.print_exc()
            report.add(rows, {"setting": name, "error": f"{type(error).__name__}: {str(error)[:200]}"})
            continue
        row = {
            "setting": name,
            "images_per_s": len(images) / seconds,
            "seconds": seconds,
            "warm_up_s": warm_up,
            "peak_memory_gib": peak,
        }
        if reference is None:
            reference = maps
        row.update(agreement_figures(maps, reference))
        row["meets_bar"] = meets_bar(row)
        report.add(rows, row)
    return reference


def run_resnet50(report, args, device, settings):
    size = 32 if args.quick else 224
    rows = report.section(
        "resnet50",
        f"torchvision ResNet-50, random weights, {size} px, {args.iterations} "
        f"iterations, no early stop, {args.images} images in batches of {args.batch_size}",
    )
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.images, 3, size, size, generator=generator).to(device)
    targets = torch.randint(0, 1000, (args.images,), generator=generator).to(device)
    config = FameConfig(iterations=args.iterations, epsilon=None, **scaled_blur(size))
    reference = compare_settings(report, rows, model, images, targets, config, settings, args.batch_size)
    return lambda later: compare_settings(
        report, rows, model, images, targets, config, later, args.batch_size, reference
    )


def run_trained(report, args, device, settings):
    from train_agreement_model import CHECKPOINT, TEST_SEED, load_agreement_model, shapes_batch

    if not CHECKPOINT.exists():
        rows = report.section("trained", f"skipped: {CHECKPOINT} missing (run benchmarks/train_agreement_model.py)")
        return
    model = load_agreement_model(CHECKPOINT, device)
    meta = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    images, labels = shapes_batch(args.images, TEST_SEED)
    rows = report.section(
        "trained",
        f"ResNet-18 trained on the shapes data (held-out accuracy "
        f"{meta['held_out_accuracy']:.3f}), 112 px, {args.iterations} iterations, "
        f"{args.images} held-out images, true class",
    )
    config = FameConfig(iterations=args.iterations, epsilon=None, **scaled_blur(112))
    compare_settings(report, rows, model, images.to(device), labels.to(device), config, settings, args.batch_size)


def run_verification(report, args, device):
    from fame.models import build_face_model

    arch = "small" if args.quick else "iresnet100"
    size = 64 if args.quick else 112
    pairs = args.pairs
    rows = report.section(
        "verification",
        f"{arch} at {size} px, random weights, {pairs} pairs, e+ and e- of one "
        f"side, epsilon 0.01, up to {args.iterations} iterations",
    )
    torch.manual_seed(0)
    model = build_face_model(arch).to(device).eval()
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(pairs, 3, size, size, generator=generator).to(device)
    references = torch.rand(pairs, 3, size, size, generator=generator).to(device)
    config = FameConfig(iterations=args.iterations, **scaled_blur(size))  # epsilon: the task's 0.01
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False  # early stopping changes the batch at every stop
    reference = None
    try:
        for precision, channels_last in (
            VERIFICATION_PRECISIONS if not args.quick else [("32", False), ("bf16-mixed", False)]
        ):
            setting = config.replace(precision=precision, channels_last=channels_last)
            name = setting_name(precision, channels_last, False)
            try:
                explain_verification(model, images[:2], references[:2], setting.replace(iterations=2))
                seconds, (maps, stats), peak = timed(
                    lambda setting=setting: explain_verification(model, images, references, setting, return_stats=True),
                    device,
                )
            except Exception as error:
                traceback.print_exc()
                report.add(rows, {"setting": name, "error": f"{type(error).__name__}: {str(error)[:200]}"})
                continue
            row = {
                "setting": name,
                "pairs_per_s": pairs / seconds,
                "seconds": seconds,
                "peak_memory_gib": peak,
                "iterations_similar": float(stats["similar"].iterations.float().mean()),
                "iterations_dissimilar": float(stats["dissimilar"].iterations.float().mean()),
            }
            stacked = torch.cat([maps["similar"], maps["dissimilar"]])
            if reference is None:
                reference = stacked
            row.update(agreement_figures(stacked, reference))
            report.add(rows, row)
    finally:
        torch.backends.cudnn.benchmark = benchmark


def run_feature_map(report, args, device):
    size = 32 if args.quick else 224
    rows = report.section(
        "feature_map", f"ResNet-50 layer4 sheet (all locations) of one {size} px image, {args.iterations} iterations"
    )
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).to(device).eval()
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2)).to(device)
    config = FameConfig(iterations=args.iterations, **scaled_blur(size))
    best = report.fastest_meeting_bar()
    fast = _parse_setting(best["setting"]) if best and best["setting"] != "32" else ("bf16-mixed", True)
    settings = [("32", False), fast]
    reference = None
    for precision, channels_last in settings:
        setting = config.replace(precision=precision, channels_last=channels_last)
        explain_feature_map(model, "layer4", image, [(0, 0)], setting.replace(iterations=2))
        seconds, maps, peak = timed(
            lambda setting=setting: explain_feature_map(model, "layer4", image, config=setting), device
        )
        row = {
            "setting": setting_name(precision, channels_last, False),
            "locations": int(maps.shape[0]),
            "seconds": seconds,
            "peak_memory_gib": peak,
        }
        if reference is None:
            reference = maps
        row.update(agreement_figures(maps, reference))
        report.add(rows, row)


def _parse_setting(name: str):
    """(precision, channels_last) of a setting name; compilation is left out of the sheet."""
    return name.split(" ")[0], "channels-last" in name


def run_cpu_ratio(report, args):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    iterations = 20
    rows = report.section(
        "cpu_ratio",
        f"CPU, 2 threads, ResNet-18 at 112 px, {iterations} iterations, batch 8: "
        "batched engine vs a loop over single images (float32)",
    )
    try:
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None).eval()
        generator = torch.Generator().manual_seed(3)
        images = torch.rand(8, 3, 112, 112, generator=generator)
        targets = torch.randint(0, 1000, (8,), generator=generator)
        config = FameConfig(iterations=iterations, **scaled_blur(112))
        explain_classification(model, images[:2], targets[:2], config.replace(iterations=1))
        cpu = torch.device("cpu")
        loop_seconds, loop_maps, _ = timed(
            lambda: torch.cat(
                [explain_classification(model, images[i : i + 1], targets[i : i + 1], config) for i in range(8)]
            ),
            cpu,
        )
        batched_seconds, batched_maps, _ = timed(lambda: explain_classification(model, images, targets, config), cpu)
        row = {"per_image_loop_s": loop_seconds, "batched_s": batched_seconds, "ratio": loop_seconds / batched_seconds}
        row.update(agreement_figures(batched_maps, loop_maps))
        report.add(rows, row)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: 32 px, 2 images, 3 iterations")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--iterations", type=int, default=None, help="default 500 (3 with --quick)")
    parser.add_argument("--images", type=int, default=None, help="default 64 (2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (2 with --quick)")
    parser.add_argument("--pairs", type=int, default=None, help="verification pairs, default 16 (2 with --quick)")
    parser.add_argument("--compile", action="store_true", help="include the compiled setting on CPU as well")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    quick_defaults = {"iterations": 3, "images": 2, "batch_size": 2, "pairs": 2}
    full_defaults = {"iterations": 500, "images": 64, "batch_size": 64, "pairs": 16}
    for key, value in (quick_defaults if args.quick else full_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    report = Report(args.out, device, args)
    if device.type == "cuda":
        settings = GPU_SETTINGS
    else:
        settings = CPU_SETTINGS + ([("bf16-mixed", True, True)] if args.compile else [])
    print(f"FAME speed on {report.figures['device_name']} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    # compiled settings go last: their compile time must not crowd out the other sections
    compiled, settings = [s for s in settings if s[2]], [s for s in settings if not s[2]]
    started = time.perf_counter()
    resnet50_later = None
    for section in args.sections:
        section_start = time.perf_counter()
        if section == "resnet50":
            resnet50_later = run_resnet50(report, args, device, settings)
        elif section == "trained":
            run_trained(report, args, device, settings)
        elif section == "verification":
            run_verification(report, args, device)
        elif section == "feature_map":
            run_feature_map(report, args, device)
        elif section == "cpu_ratio":
            run_cpu_ratio(report, args)
        print(f"  ({section}: {time.perf_counter() - section_start:.0f} s)", flush=True)
    if resnet50_later is not None and compiled:
        section_start = time.perf_counter()
        print("\n## resnet50, compiled settings (added to the resnet50 table)", flush=True)
        resnet50_later(compiled)
        print(f"  (compiled: {time.perf_counter() - section_start:.0f} s)", flush=True)
    report.figures["total_seconds"] = time.perf_counter() - started
    report.write()
    print(f"\nwrote {report.json_path} and {report.markdown_path} in {report.figures['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
