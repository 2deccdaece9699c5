"""The auto batch size (README, "Speed") under a simulated memory cap on CPU."""

import pytest
import torch
import torchvision
from nets import CappedMemory, TinyClassifier, TinyEmbedder

from fame import FameConfig, explain_classification, explain_verification
from fame.explain import CPU_MAX_BATCH, find_batch_size, ram_fits, trial_fits
from fame.explain.batching import saved_bytes

SHAPE = (3, 12, 12)
CONFIG = FameConfig(precision="bf16-mixed")


@pytest.mark.parametrize("capacity,start", [(37, 8), (5, 8), (64, 4), (1, 1), (200, 16)])
def test_auto_batch_size_is_the_largest_that_fits(capacity, start):
    model = CappedMemory(TinyClassifier(), capacity)
    fits = trial_fits(model, SHAPE, CONFIG, torch.device("cpu"))
    found = find_batch_size(model, SHAPE, CONFIG, "cpu", start=start, max_batch=128, fits=fits)
    assert found == min(capacity, 128)
    assert all(batch <= 2 * max(capacity, start) for batch in model.batches)
    assert all(m.training for m in model.modules())  # the model is left as found


def test_verification_batch_counts_both_modes_against_the_memory_cap():
    model = CappedMemory(TinyEmbedder(), 24)
    config = FameConfig(iterations=3, blur_kernel=5, blur_sigma=1.3)
    fits = trial_fits(model, SHAPE, config, torch.device("cpu"))
    samples = find_batch_size(model, SHAPE, config, "cpu", fits=fits, images_per_sample=2)
    assert samples == 12
    model.batches.clear()
    maps = explain_verification(model, torch.rand(samples, *SHAPE), torch.rand(samples, *SHAPE), config)
    assert max(model.batches) == 24 and maps["similar"].shape[0] == samples
    assert find_batch_size(model, SHAPE, config, "cpu", max_batch=16, fits=fits, images_per_sample=2) == 8
    with pytest.raises(ValueError, match="max_batch must hold one sample of 2 images"):
        find_batch_size(model, SHAPE, config, "cpu", max_batch=1, fits=fits, images_per_sample=2)


def test_nothing_fits_is_an_error():
    model = CappedMemory(TinyClassifier(), 0)
    with pytest.raises(RuntimeError, match="not even one"):
        find_batch_size(model, SHAPE, CONFIG, "cpu", fits=trial_fits(model, SHAPE, CONFIG, torch.device("cpu")))


def test_other_errors_are_not_taken_for_a_full_memory():
    model = TinyClassifier()
    with pytest.raises(RuntimeError, match="shape|size|channels"):
        find_batch_size(model, (3, 1, 1), CONFIG, "cpu", fits=trial_fits(model, (1, 5, 5), CONFIG, torch.device("cpu")))


def test_cpu_estimate_stays_within_the_given_ram():
    model = TinyClassifier()
    per_image = saved_bytes(model, SHAPE, CONFIG, torch.device("cpu"), 2) - saved_bytes(
        model, SHAPE, CONFIG, torch.device("cpu"), 1
    )
    assert per_image > 0
    budget = 40 * per_image  # half of it usable, twice the saved bytes per image: at most 10 images
    found = find_batch_size(
        model, SHAPE, CONFIG, "cpu", fits=ram_fits(model, SHAPE, CONFIG, torch.device("cpu"), available_bytes=budget)
    )
    assert 1 <= found <= 10
    assert find_batch_size(model, SHAPE, CONFIG, "cpu") <= CPU_MAX_BATCH


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_batch_size_runs_and_is_monotone_in_the_image_size():
    model = torchvision.models.resnet18(weights=None).cuda().eval()
    small = find_batch_size(model, (3, 64, 64), CONFIG, "cuda", start=64, max_batch=1024)
    large = find_batch_size(model, (3, 224, 224), CONFIG, "cuda", start=64, max_batch=1024)
    print(f"auto batch size of ResNet-18 in bf16-mixed: {small} at 64 px, {large} at 224 px")
    assert 1 <= large <= small <= 1024
    images = torch.rand(large, 3, 224, 224, device="cuda")
    explain_classification(
        model,
        images,
        torch.zeros(large, dtype=torch.long, device="cuda"),
        FameConfig(iterations=2, precision="bf16-mixed", blur_kernel=None),
    )
