"""ROAD with noisy linear imputation: fame's batched solver against grad-cam's per-image scipy solve (issue 8).

    python benchmarks/metrics_speed.py                      # 16 images, 224 px, ResNet-18, CPU, ~1 minute
    python benchmarks/metrics_speed.py --threads 1          # one CPU thread each
    python benchmarks/metrics_speed.py --images 4 --size 64 # smoke run
    python benchmarks/metrics_speed.py --device cuda        # ours on the GPU as well (grad-cam stays on the CPU)

Both sides get the same images, the same smooth maps (bilinear from 7 x 7, no ties), the same
torchvision ResNet-18 with random weights (seed 0, eval mode) and remove the most relevant
P = 10, 20, ..., 90 % of pixels (P = 0 needs no imputation; at P = 100 grad-cam's system is
singular). grad-cam: ``ROADMostRelevantFirst(percentile=100 - P)`` per P with
``return_diff=False`` (one forward pass per P, like ours). Ours: ``fame.metrics.road.road_curve``.
Both run on ``--threads`` CPU threads (default: every core torch uses; scipy's sparse solve inside
grad-cam is single-threaded whatever the setting, its forward passes are not). Reported: images/s end to
end (imputation + forward pass per P) and for the imputation alone (end to end minus the time of the same
forward passes on clean images), both in total and per P (each P is timed on its own), and the agreement of
the curves: mean |target-logit difference| between grad-cam and ours, next to the difference between two
runs of ours with different noise seeds (the floor set by the N(0, 0.01) noise). The end-to-end speed-up
can never exceed grad-cam's total time over the time of its forward passes (printed as the bound). Figures
go to ``<out>/metrics_speed_<device>_<threads>threads.json`` and are printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from fame.metrics.road import road_curve


def make_inputs(images: int, size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(images, 3, 14, 14, generator=generator)
    batch = F.interpolate(coarse, size=size, mode="bilinear") + 0.1 * torch.randn(
        images, 3, size, size, generator=generator
    )
    batch = (batch - 0.5) / 0.25  # roughly normalized inputs
    maps = F.interpolate(
        torch.rand(images, 1, 7, 7, generator=generator), size=size, mode="bilinear", align_corners=False
    )
    maps = maps + 1e-6 * torch.rand(maps.shape, generator=generator)  # no ties
    return batch, maps


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def grad_cam_level(model, images, maps, targets):
    """grad-cam's target logits (B,) at one percentage P of removed pixels."""
    from pytorch_grad_cam.metrics.road import ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cams = maps[:, 0].numpy()
    labels = [ClassifierOutputTarget(int(t)) for t in targets]

    def level(percentage):
        metric = ROADMostRelevantFirst(percentile=100 - percentage)
        return torch.from_numpy(np.asarray(metric(images, cams, labels, model, return_diff=False))).float()

    return level


def per_percentage(level, percentages):
    """Curves (B, P) and seconds per percentage of ``level(P)`` called for each P in turn."""
    columns, seconds = [], []
    for percentage in percentages:
        column, elapsed = timed(lambda percentage=percentage: level(percentage))
        columns.append(column)
        seconds.append(elapsed)
    return torch.stack(columns, dim=1), seconds


def imputation_speedup(theirs_seconds, ours_seconds, forward_seconds, noise=0.05):
    """Ratio of the imputation times (each run's time minus the forward passes); None where either
    is within ``noise`` of the forward time, i.e. too small to tell from timing noise."""
    theirs, ours = theirs_seconds - forward_seconds, ours_seconds - forward_seconds
    if min(theirs, ours) <= noise * forward_seconds:
        return None
    return theirs / ours


def forward_pass(model, images):
    with torch.no_grad():
        return model(images)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="where ours also runs besides the CPU (e.g. cuda)")
    parser.add_argument("--skip-grad-cam", action="store_true", help="time ours only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    percentages = list(range(10, 100, 10))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    images, maps = make_inputs(args.images, args.size)
    with torch.no_grad():
        targets = model(images).argmax(dim=1)
    figures = {
        "images": args.images,
        "size": args.size,
        "percentages": percentages,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }

    _, forward_by_level = per_percentage(lambda _: forward_pass(model, images), percentages)
    forward_seconds = sum(forward_by_level)
    figures["forward_seconds_cpu"] = forward_seconds
    # one generator through the percentages draws the same noise as one road_curve call over all of them
    generator = torch.Generator().manual_seed(1)
    ours, ours_by_level = per_percentage(
        lambda percentage: road_curve(model, images, maps, targets, [percentage], generator=generator).logit[:, 0],
        percentages,
    )
    ours_seconds = sum(ours_by_level)
    reseeded = road_curve(model, images, maps, targets, percentages, generator=torch.Generator().manual_seed(2)).logit
    figures["ours_cpu"] = {
        "seconds": ours_seconds,
        "images_per_second": args.images / ours_seconds,
        "imputation_images_per_second": args.images * len(percentages) / max(ours_seconds - forward_seconds, 1e-9),
    }
    figures["noise_floor_mean_abs_logit_difference"] = float((ours - reseeded).abs().mean())

    if not args.skip_grad_cam:
        theirs, theirs_by_level = per_percentage(grad_cam_level(model, images, maps, targets), percentages)
        theirs_seconds = sum(theirs_by_level)
        figures["grad_cam_cpu"] = {
            "seconds": theirs_seconds,
            "images_per_second": args.images / theirs_seconds,
            "imputation_images_per_second": args.images
            * len(percentages)
            / max(theirs_seconds - forward_seconds, 1e-9),
        }
        figures["speedup_end_to_end"] = theirs_seconds / ours_seconds
        figures["speedup_imputation"] = imputation_speedup(theirs_seconds, ours_seconds, forward_seconds)
        figures["speedup_end_to_end_bound"] = theirs_seconds / forward_seconds
        figures["speedup_imputation_by_percentage"] = {
            percentage: imputation_speedup(theirs_level, ours_level, forward)
            for percentage, theirs_level, ours_level, forward in zip(
                percentages, theirs_by_level, ours_by_level, forward_by_level
            )
        }
        difference = (ours - theirs).abs()
        figures["grad_cam_vs_ours_mean_abs_logit_difference"] = float(difference.mean())
        figures["grad_cam_vs_ours_max_abs_logit_difference"] = float(difference.max())
        figures["mean_curve_ours"] = ours.mean(dim=0).tolist()
        figures["mean_curve_grad_cam"] = theirs.mean(dim=0).tolist()

    if args.device != "cpu":
        device = torch.device(args.device)
        model_device, images_device, maps_device, targets_device = (
            model.to(device),
            images.to(device),
            maps.to(device),
            targets.to(device),
        )
        road_curve(model_device, images_device, maps_device, targets_device, percentages[:1])  # warm-up
        torch.cuda.synchronize() if device.type == "cuda" else None

        def run_device():
            curves = road_curve(
                model_device,
                images_device,
                maps_device,
                targets_device,
                percentages,
                generator=torch.Generator().manual_seed(1),
            )
            torch.cuda.synchronize() if device.type == "cuda" else None
            return curves

        on_device, device_seconds = timed(run_device)
        figures[f"ours_{device.type}"] = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "seconds": device_seconds,
            "images_per_second": args.images / device_seconds,
        }
        figures[f"{device.type}_vs_cpu_max_abs_logit_difference"] = float((on_device.logit.cpu() - ours).abs().max())
        if "grad_cam_cpu" in figures:
            figures[f"speedup_{device.type}_vs_grad_cam_cpu"] = figures["grad_cam_cpu"]["seconds"] / device_seconds

    print(markdown(figures))
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.device.split(":")[0]
    path = args.out / f"metrics_speed_{tag}_{args.threads}threads.json"
    path.write_text(json.dumps(figures, indent=2))
    print(f"\nwrote {path}")


def ratio(speedup) -> str:
    return "n/a (within timing noise)" if speedup is None else f"{speedup:.1f}x"


def markdown(figures: dict) -> str:
    lines = [
        f"ROAD (noisy linear imputation), {figures['images']} images at {figures['size']} px, "
        f"ResNet-18, P = {figures['percentages'][0]}..{figures['percentages'][-1]} %, "
        f"{figures['threads']} CPU thread(s)",
        "",
        "| implementation | seconds | images/s (end to end) | imputations/s (imputation only) |",
        "|---|---|---|---|",
    ]
    for key, name in (
        ("grad_cam_cpu", "grad-cam ROADMostRelevantFirst, CPU"),
        ("ours_cpu", "fame road_curve, CPU"),
        ("ours_cuda", "fame road_curve, GPU"),
    ):
        if key in figures:
            row = figures[key]
            imputation = f"{row['imputation_images_per_second']:.2f}" if "imputation_images_per_second" in row else "-"
            lines.append(f"| {name} | {row['seconds']:.2f} | {row['images_per_second']:.3f} | {imputation} |")
    lines.append("")
    lines.append(f"forward passes alone (CPU): {figures['forward_seconds_cpu']:.2f} s")
    if "speedup_end_to_end" in figures:
        lines.append(
            f"speed-up on CPU: {figures['speedup_end_to_end']:.1f}x end to end "
            f"(at most {figures['speedup_end_to_end_bound']:.1f}x "
            f"with free imputation), {ratio(figures['speedup_imputation'])} imputation only"
        )
        lines.append(
            "imputation speed-up by P: "
            + ", ".join(
                f"{percentage} %: {ratio(speedup)}"
                for percentage, speedup in figures["speedup_imputation_by_percentage"].items()
            )
        )
        lines.append(
            "curve agreement: mean |logit ours - grad-cam| = "
            f"{figures['grad_cam_vs_ours_mean_abs_logit_difference']:.4f} "
            f"(max {figures['grad_cam_vs_ours_max_abs_logit_difference']:.4f}); two noise seeds of ours differ by "
            f"{figures['noise_floor_mean_abs_logit_difference']:.4f}"
        )
    if "speedup_cuda_vs_grad_cam_cpu" in figures:
        lines.append(
            f"GPU vs grad-cam on CPU: {figures['speedup_cuda_vs_grad_cam_cpu']:.0f}x; "
            f"GPU vs CPU curves max |diff| {figures['cuda_vs_cpu_max_abs_logit_difference']:.2e}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
