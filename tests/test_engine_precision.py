"""FAME's precision, memory-format and compile settings (README, "Speed") on CPU."""

import copy

import pytest
import torch
from nets import TinyBackbone, TinyClassifier, TinyEmbedder
from torch import nn

from fame import FameConfig, explain, explain_classification, explain_feature_map, explain_verification
from fame.data import ShapesDataset
from fame.explain import engine, lots_perturbation
from fame.explain.engine import InputGradient, batch_bucket
from fame.explain.precision import map_agreement

SIZE = 32
CONFIG = FameConfig(step_size=2 / 255, iterations=20, blur_kernel=7, blur_sigma=1.1)
MODES = [("32", False), ("tf32", False), ("bf16-mixed", False), ("bf16-mixed", True), ("16-mixed", True), ("32", True)]


class ShapesNet(nn.Module):
    """conv-BN-ReLU x 3, global pooling, linear: small enough to train on CPU in seconds."""

    def __init__(self, classes: int = 6):
        super().__init__()
        layers, channels = [], 3
        for width, stride in ((16, 1), (32, 2), (32, 2)):
            layers += [nn.Conv2d(channels, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def trained():
    """A ShapesNet trained for 3 epochs on 256 shapes images (32 px), and 16 held-out images."""
    torch.manual_seed(0)
    train = ShapesDataset(256, image_size=SIZE, seed=0)
    images = torch.stack([train[i]["image"] for i in range(len(train))])
    labels = torch.tensor([train[i]["label"] for i in range(len(train))])
    model = ShapesNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for start in range(0, len(images), 32):
            loss = nn.functional.cross_entropy(model(images[start : start + 32]), labels[start : start + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    held_out = ShapesDataset(16, image_size=SIZE, seed=1)
    test_images = torch.stack([held_out[i]["image"] for i in range(16)])
    test_labels = torch.tensor([held_out[i]["label"] for i in range(16)])
    return model.eval(), test_images, test_labels


def test_bf16_mixed_agrees_with_float32_on_a_trained_model(trained):
    model, images, labels = trained
    reference = explain_classification(model, images, labels, CONFIG)
    maps = explain_classification(model, images, labels, CONFIG.replace(precision="bf16-mixed", channels_last=True))
    agreement = map_agreement(maps, reference)
    spearman = agreement["spearman"]
    print(
        f"bf16-mixed + channels-last: Spearman median {spearman.median():.4f}, "
        f"5th percentile {spearman.quantile(0.05):.4f}, max |diff| {agreement['max_abs_difference'].max():.4f}"
    )
    assert spearman.median() >= 0.99  # the agreement bar; measured 0.998 / 0.992 (with 1 and 2 threads)
    assert spearman.quantile(0.05) >= 0.97
    assert maps.dtype == torch.float32


def test_tf32_and_channels_last_in_float32_equal_the_reference_on_cpu(trained):
    model, images, labels = trained
    short = CONFIG.replace(iterations=8)
    reference = explain_classification(model, images[:2], labels[:2], short)
    for config in (short.replace(precision="tf32"), short.replace(channels_last=True)):
        maps = explain_classification(model, images[:2], labels[:2], config)
        torch.testing.assert_close(maps, reference, atol=2e-3, rtol=0)


def test_16_mixed_runs_and_agrees_on_cpu(trained):
    model, images, labels = trained
    config = CONFIG.replace(iterations=10)
    reference = explain_classification(model, images[:2], labels[:2], config)
    maps, stats = explain_classification(
        model, images[:2], labels[:2], config.replace(precision="16-mixed"), return_stats=True
    )
    assert stats.iterations.tolist() == [10] * 2
    assert map_agreement(maps, reference)["spearman"].median() >= 0.9


def test_16_mixed_loss_scale_backs_off_when_the_gradient_overflows():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(2000.0)  # d loss / dx = 2000 * scale: 2000 * 2^16 overflows float16

    def objective(batch, index):
        return layer(batch.flatten(1)).squeeze(1)

    x = torch.rand(2, 1, 2, 2)
    config = FameConfig(step_size=0.01, iterations=1, precision="16-mixed")
    step = InputGradient(objective, config, batch=2, device=x.device, dtype=torch.float32)
    loss, gradient = step.loss_and_gradient(x, torch.arange(2), torch.arange(2), step=0)
    assert step.loss_scale.scale < 2**16 and step.loss_scale.scale * 2000 < 65504
    torch.testing.assert_close(gradient, torch.full_like(x, 2000.0))
    result = lots_perturbation(objective, x, config)
    torch.testing.assert_close(result.perturbed, x - 0.01)


def test_outer_autocast_does_not_change_the_engine_and_is_left_as_found(trained):
    model, images, labels = trained
    images, labels, config = images[:2], labels[:2], CONFIG.replace(iterations=5)
    reference = explain_classification(model, images, labels, config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = explain_classification(model, images, labels, config)
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    torch.testing.assert_close(inside, reference, atol=0, rtol=0)
    mixed = explain_classification(model, images, labels, config.replace(precision="bf16-mixed"))
    with torch.autocast("cpu", dtype=torch.float16):
        mixed_inside = explain_classification(model, images, labels, config.replace(precision="bf16-mixed"))
    torch.testing.assert_close(mixed_inside, mixed, atol=0, rtol=0)


def test_tf32_flags_are_set_for_the_run_and_restored():
    seen = []
    model = TinyClassifier()

    def objective(batch):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))
        return model(batch)[:, 0]

    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("medium")
        torch.backends.cudnn.allow_tf32 = True
        explain(model, torch.rand(2, 3, 8, 8), objective, FameConfig(iterations=1, blur_kernel=None))
        assert seen[-1] == ("highest", False)
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("medium", True)
        torch.backends.cudnn.allow_tf32 = False
        explain(model, torch.rand(2, 3, 8, 8), objective, FameConfig(iterations=1, blur_kernel=None, precision="tf32"))
        assert seen[-1] == ("high", True)
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == ("medium", False)
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_channels_last_is_undone_exactly_also_for_a_partly_converted_model():
    model = TinyBackbone()
    model.stage1[0].to(memory_format=torch.channels_last)  # the user's own choice for one layer
    before = {name: (tensor.data_ptr(), tensor.stride()) for name, tensor in model.state_dict().items()}
    parameters = list(model.parameters())
    strides_inside = []

    def objective(batch, index):
        strides_inside.append(model.stage2[1].weight.is_contiguous(memory_format=torch.channels_last))
        return model(batch)[:, 0]

    explain(model, torch.rand(2, 3, 12, 12), objective, FameConfig(iterations=2, blur_kernel=None, channels_last=True))
    assert strides_inside and all(strides_inside)
    after = {name: (tensor.data_ptr(), tensor.stride()) for name, tensor in model.state_dict().items()}
    assert after == before
    assert all(a is b for a, b in zip(parameters, model.parameters()))


@pytest.mark.parametrize("precision,channels_last", MODES)
def test_early_stopping_gives_per_sample_iterations_in_every_mode(precision, channels_last):
    x = torch.zeros(3, 1, 8, 8)
    start = torch.tensor([0.05, 1.0, 3.0])
    config = FameConfig(
        step_size=1 / 64, iterations=50, epsilon=0.1, blur_kernel=None, precision=precision, channels_last=channels_last
    )
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)

    def objective(batch, index):  # every pixel has gradient 1: each step lowers the loss by 1
        return start[index] + conv(batch).flatten(1).sum(dim=1).float()

    stats = lots_perturbation(objective, x, config).stats
    assert stats.iterations.tolist() == [0, 1, 3]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_verification_and_feature_map_sheet_use_the_precision(precision):
    embedder = TinyEmbedder()
    x, references = torch.rand(2, 3, 12, 12), torch.rand(2, 3, 12, 12)
    config = FameConfig(step_size=0.02, iterations=4, blur_kernel=5, blur_sigma=1.3, epsilon=None)
    reference = explain_verification(embedder, x, references, config)
    mixed, stats = explain_verification(embedder, x, references, config.replace(precision=precision), return_stats=True)
    for mode in reference:
        assert mixed[mode].dtype == torch.float32 and stats[mode].iterations.tolist() == [4, 4]
        assert map_agreement(mixed[mode], reference[mode])["spearman"].min() >= 0.8
    backbone = TinyBackbone()
    sheet = explain_feature_map(backbone, "stage1", x[:1], [(0, 0), (3, 3)], config)
    mixed_sheet = explain_feature_map(backbone, "stage1", x[:1], [(0, 0), (3, 3)], config.replace(precision=precision))
    assert map_agreement(mixed_sheet, sheet)["spearman"].min() >= 0.8


def test_map_agreement_of_identical_and_reversed_maps():
    maps = torch.rand(3, 1, 6, 6)
    same = map_agreement(maps, maps)
    assert torch.all(same["spearman"] == 1) and torch.all(same["max_abs_difference"] == 0)
    reversed_ = map_agreement(1 - maps, maps)
    torch.testing.assert_close(reversed_["spearman"], torch.full((3,), -1.0, dtype=torch.float64))
    empty = torch.zeros(1, 1, 4, 4)
    assert map_agreement(empty, empty)["spearman"].item() == 1.0


def test_unknown_precision_and_non_bool_flags_are_refused():
    with pytest.raises(ValueError, match="unknown FAME precision 'bf16'.*'bf16-mixed'"):
        FameConfig(precision="bf16")
    with pytest.raises(TypeError, match="channels_last must be True or False"):
        FameConfig(channels_last="yes")


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def buckets_of_compiled_steps(iterations: list, batch: int) -> set:
    """The padded batch sizes of steps 1, 2, ... (step 0 runs eagerly) for per-sample step counts."""
    return {batch_bucket(sum(count >= step for count in iterations), batch) for step in range(1, max(iterations) + 1)}


def staircase_case():
    """TinyClassifier on 8 ever brighter copies of one image: below epsilon, image k stops after
    k + 1 steps (each loss at least 8e-4 away from epsilon at every step)."""
    base = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images = base + 0.1 * torch.arange(8).view(-1, 1, 1, 1)
    config = FameConfig(step_size=0.05, iterations=10, blur_kernel=5, blur_sigma=1.3, epsilon=-0.319)
    return TinyClassifier(), images, torch.zeros(8, dtype=torch.long), config


class Staircase:
    """Sample k of ``batch`` starts at loss k + 0.5 and each step of 1/64 on 8 x 8 pixels of a
    1x1 convolution of weight 1 lowers it by 1: below 0.1, sample k stops after k + 1 steps."""

    accepts_index = True

    def __init__(self, model: nn.Module, batch: int):
        self.model = model
        self.start = torch.arange(batch, dtype=torch.float32) + 0.5

    def __call__(self, images, index):
        return self.start[index] + self.model(images).flatten(1).sum(dim=1)


def unit_convolution() -> nn.Module:
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    return conv


def staircase_config(batch: int) -> FameConfig:
    return FameConfig(step_size=1 / 64, iterations=batch + 3, epsilon=0.1, blur_kernel=None)


@pytest.mark.slow
def test_compiled_step_equals_eager_while_early_stopping_shrinks_the_buckets():
    """torch.compile of the forward + input gradient (about a minute of compiling on 2 CPU cores)."""
    torch._dynamo.reset()
    model, images, targets, config = staircase_case()
    eager, eager_stats = explain_classification(model, images, targets, config, return_stats=True)
    before = compiled_graphs()
    compiled, stats = explain_classification(model, images, targets, config.replace(compile=True), return_stats=True)
    assert stats.iterations.tolist() == eager_stats.iterations.tolist() == list(range(1, 9))
    buckets = buckets_of_compiled_steps(stats.iterations.tolist(), len(images))
    assert buckets == {8, 4, 2, 1} and compiled_graphs() - before == len(buckets)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)


def test_compiled_graphs_depend_on_the_buckets_not_on_the_batch_sizes_of_the_calls():
    """The objective's per-sample tensor (``start``, as long as the batch) must not make dynamo
    recompile every bucket for a call with another batch size."""
    torch._dynamo.reset()
    model, before, buckets = unit_convolution(), compiled_graphs(), set()
    for batch in (13, 11):
        images, config = torch.zeros(batch, 1, 8, 8), staircase_config(batch)
        eager, eager_stats = explain(model, images, Staircase(model, batch), config, return_stats=True)
        compiled, stats = explain(
            model, images, Staircase(model, batch), config.replace(compile=True), return_stats=True
        )
        assert stats.iterations.tolist() == eager_stats.iterations.tolist() == list(range(1, batch + 1))
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
        buckets |= buckets_of_compiled_steps(stats.iterations.tolist(), batch)
    assert buckets == {13, 11, 8, 4, 2, 1} and compiled_graphs() - before == len(buckets)


def test_past_dynamos_recompile_limit_a_compiled_run_warns_and_finishes_eagerly(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(engine, "COMPILED_GRAPHS_LIMIT", 1)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)  # the run raises it to 3 buckets + 1
    model, images, config = unit_convolution(), torch.zeros(3, 1, 8, 8), staircase_config(3).replace(compile=True)
    explain(model, images, Staircase(model, 3), config)
    other_objective = type("OtherStaircase", (Staircase,), {})(model, 3)  # one more graph per bucket
    with pytest.warns(RuntimeWarning, match="recompile_limit .*the rest of this run is eager"):
        maps, stats = explain(model, images, other_objective, config, return_stats=True)
    eager, eager_stats = explain(model, images, other_objective, config.replace(compile=False), return_stats=True)
    assert stats.iterations.tolist() == eager_stats.iterations.tolist() == [1, 2, 3]
    torch.testing.assert_close(maps, eager, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- on a GPU (benchmarks/gpu_suite.sh runs these)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision,channels_last", [("tf32", False), ("bf16-mixed", True), ("16-mixed", True)])
def test_cuda_precisions_agree_with_float32_on_a_trained_model(trained, precision, channels_last):
    model, images, labels = trained
    model, images, labels = copy.deepcopy(model).cuda(), images.cuda(), labels.cuda()
    reference = explain_classification(model, images, labels, CONFIG)
    maps, stats = explain_classification(
        model, images, labels, CONFIG.replace(precision=precision, channels_last=channels_last), return_stats=True
    )
    spearman = map_agreement(maps, reference)["spearman"]
    print(
        f"cuda {precision} channels_last={channels_last}: Spearman median {spearman.median():.4f}, "
        f"5th percentile {spearman.quantile(0.05):.4f}"
    )
    assert maps.dtype == torch.float32 and stats.iterations.tolist() == [20] * len(images)
    assert spearman.median() >= 0.95 and spearman.quantile(0.05) >= 0.8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_step_equals_eager_with_early_stopping():
    model, x, targets, config = staircase_case()
    model, x, targets = model.cuda(), x.cuda(), targets.cuda()
    eager, eager_stats = explain_classification(model, x, targets, config, return_stats=True)
    compiled, compiled_stats = explain_classification(
        model, x, targets, config.replace(compile=True, channels_last=True), return_stats=True
    )
    assert compiled_stats.iterations.tolist() == eager_stats.iterations.tolist()
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=0)


def test_inside_a_lightning_trainer_the_engines_precision_wins():
    import lightning as L

    model = TinyClassifier()
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    config = FameConfig(step_size=0.02, iterations=4, blur_kernel=5, blur_sigma=1.3)

    class Explainer(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def predict_step(self, batch, batch_idx):
            assert torch.is_autocast_enabled("cpu")  # the trainer's bf16 autocast is on around the step
            return explain_classification(self.model, batch[0], [0, 1], config)

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="bf16-mixed",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    (maps,) = trainer.predict(Explainer(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=2))
    torch.testing.assert_close(maps, explain_classification(model, x, [0, 1], config), atol=0, rtol=0)


def test_a_bfloat16_model_runs_under_bf16_mixed_with_float32_steps():
    model = TinyClassifier().to(torch.bfloat16)
    maps, stats = explain_classification(
        model,
        torch.rand(2, 3, 12, 12),
        [0, 1],
        FameConfig(step_size=0.02, iterations=3, blur_kernel=5, blur_sigma=1.3, precision="bf16-mixed"),
        return_stats=True,
    )
    assert maps.dtype == torch.float32 and stats.iterations.tolist() == [3, 3]
