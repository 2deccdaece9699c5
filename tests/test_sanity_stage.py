"""The evaluate stage's model-randomisation sanity check on a tiny classifier and a hand-built store."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from literal_baselines import literal_reinitialize
from omegaconf import OmegaConf
from PIL import Image
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

from fame.config import ConfigError
from fame.explain.registry import get_method
from fame.metrics.sanity import randomize_parameters_
from fame.models import Classifier, SmallCNN
from fame.pipeline import sanity_records
from fame.report import plot_sanity
from fame.stages.evaluate import complete_entries
from fame.store import MapStore

SIZE, COUNT = 16, 5
FULLGRAD = {"name": "fullgrad"}  # gradient-based; Grad-CAM maps of an untrained net are often all zero
RANDOM = {"name": "random", "seed": 0}


def tiny_model():
    torch.manual_seed(0)
    net = SmallCNN(num_classes=3, widths=(4, 6), dropout=0.0)
    with torch.no_grad():  # non-trivial batch-norm statistics and affine parameters
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return Classifier(net, name="tiny", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()


def tiny_dataset():
    generator = torch.Generator().manual_seed(1)
    return [
        {"image": torch.rand(3, SIZE, SIZE, generator=generator), "label": k % 3, "id": f"s{k}"} for k in range(COUNT)
    ]


def tiny_store(path, dataset, methods, task="classification", target="label", input_space="pixels"):
    """A store whose maps are complete (their values do not matter: the check recomputes them)."""
    store = MapStore.create_or_open(path, num_samples=len(dataset), size=(SIZE, SIZE), meta={"task": task})
    ids = [item["id"] for item in dataset]
    for options in methods:
        entry = store.begin_method(options["name"], {"method": options, "target": target, "input_space": input_space})
        store.write(entry, list(range(len(dataset))), ids, np.full((len(dataset), SIZE, SIZE), 0.5, np.float32))
    return store


def sanity_config(samples=3, layers=None, randomization="reinit"):
    return OmegaConf.create(
        {"seed": 7, "batch_size": 2, "sanity": {"samples": samples, "layers": layers, "randomization": randomization}}
    )


def run(store, model, dataset, config):
    entries, _, rows = complete_entries(store, None)
    return sanity_records(config, model, store, entries, dataset, rows, torch.device("cpu"))


@pytest.mark.parametrize(
    "target, input_space, names, randomization",
    [
        ("label", "pixels", ["net.classifier", "net.stages"], "reinit"),
        ("prediction", "normalized", ["classifier", "stages"], "redraw"),
    ],
)
def test_rows_match_a_direct_randomization_and_leave_the_model(tmp_path, target, input_space, names, randomization):
    model, dataset = tiny_model(), tiny_dataset()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    store = tiny_store(tmp_path / "maps.zarr", dataset, [FULLGRAD, RANDOM], target=target, input_space=input_space)
    records, layer_names = run(store, model, dataset, sanity_config(randomization=randomization))
    assert layer_names == names
    frame = pd.DataFrame.from_records(records)
    assert list(frame.columns) == ["method", "metric", "level", "value", "sample_id"]
    assert len(frame) == 2 * 2 * 2 * 3  # methods x metrics x steps x samples
    spearman, ssim = (
        ("sanity_spearman", "sanity_ssim")
        if randomization == "reinit"
        else ("sanity_redraw_spearman", "sanity_redraw_ssim")
    )
    assert set(frame["metric"]) == {spearman, ssim} and set(frame["level"]) == {1.0, 2.0}
    assert set(frame["sample_id"]) == {"s0", "s1", "s2"}

    # The caller's model is untouched (weights, buffers, gradients).
    for key, value in model.state_dict().items():
        assert value.equal(before[key]), f"{key} changed"
    assert all(parameter.grad is None for parameter in model.parameters())

    # The random floor ignores the model: identical maps at every step.
    floor = frame[frame["method"] == "random"]
    assert np.allclose(floor["value"], 1.0, atol=1e-6)

    # FullGrad against the definitions: the same blocks re-initialised / redrawn from a generator seeded with `seed`.
    images = torch.stack([item["image"] for item in dataset[:3]])
    targets = torch.tensor([item["label"] for item in dataset[:3]])
    if target == "prediction":
        with torch.no_grad():
            targets = model(images).argmax(dim=1)
    seen = model
    if input_space == "normalized":
        images, seen = model.normalize(images), model.net
    fullgrad, ids = get_method("fullgrad", "classification"), ["s0", "s1", "s2"]
    randomized = copy.deepcopy(seen)
    intact = fullgrad(randomized, images, targets, ids=ids).maps[""]
    generator = torch.Generator().manual_seed(7)
    cam = frame[frame["method"] == "fullgrad"]
    assert np.isfinite(cam["value"]).all()
    for step, name in enumerate(names, start=1):
        if randomization == "reinit":
            literal_reinitialize(randomized.get_submodule(name), int(torch.randint(0, 2**62, (), generator=generator)))
        else:
            randomize_parameters_(randomized.get_submodule(name), generator)
        maps = fullgrad(randomized, images, targets, ids=ids).maps[""]
        for b, sid in enumerate(ids):
            first, second = intact[b, 0].numpy().astype(np.float64), maps[b, 0].numpy().astype(np.float64)
            expected_rho = spearmanr(first.ravel(), second.ravel()).statistic
            expected_ssim = structural_similarity(first.astype(np.float32), second.astype(np.float32), data_range=1.0)
            row = cam[(cam["level"] == step) & (cam["sample_id"] == sid)].set_index("metric")["value"]
            np.testing.assert_allclose(row[spearman], expected_rho, atol=1e-4)
            np.testing.assert_allclose(row[ssim], expected_ssim, atol=1e-4)
    first_step = cam[(cam["metric"] == spearman) & (cam["level"] == 1.0)]["value"]
    assert (first_step < 0.99).all()  # the map follows the randomized classifier weights


def test_explicit_layers_samples_and_plot(tmp_path):
    model, dataset = tiny_model(), tiny_dataset()
    store = tiny_store(tmp_path / "maps.zarr", dataset, [RANDOM])
    layers = ["net.classifier", "net.stages.1", "net.stages.0.0.0"]
    records, layer_names = run(store, model, dataset, sanity_config(samples=10, layers=layers))
    assert layer_names == layers
    frame = pd.DataFrame.from_records(records)
    assert set(frame["level"]) == {1.0, 2.0, 3.0} and frame["sample_id"].nunique() == COUNT  # samples > rows: all
    path = plot_sanity(frame, layer_names, tmp_path / "figures" / "sanity.png")
    assert path == tmp_path / "figures" / "sanity.png"
    with Image.open(path) as image:
        assert image.width > image.height > 100  # two panels side by side
    from fame.report import summarize

    summary = summarize(frame, resamples=50)
    assert plot_sanity(summary, layer_names, tmp_path / "summary.png").is_file()
    with pytest.raises(ValueError, match="sanity"):
        plot_sanity(frame[frame["metric"] == "nothing"], layer_names, tmp_path / "empty.png")


def test_config_errors(tmp_path):
    model, dataset = tiny_model(), tiny_dataset()
    pairs = tiny_store(tmp_path / "pairs.zarr", dataset, [RANDOM], task="verification")
    with pytest.raises(ConfigError, match="needs a classification store"):
        sanity_records(sanity_config(), model, pairs, ["random"], dataset, np.arange(COUNT), "cpu")
    store = tiny_store(tmp_path / "maps.zarr", dataset, [RANDOM])
    with pytest.raises(ConfigError, match=r"\['fc', 'layer4'\].*net\.classifier.*net\.stages\.1\.0\.0"):
        run(store, model, dataset, sanity_config(layers=["fc", "layer4"]))
    with pytest.raises(ConfigError, match="sanity.samples"):
        run(store, model, dataset, sanity_config(samples=0))
    with pytest.raises(ConfigError, match="sanity.layers"):
        run(store, model, dataset, sanity_config(layers="net.classifier"))
    with pytest.raises(
        ConfigError, match="'sanity.randomization' has the value 'shuffle'; allowed: one of 'reinit', 'redraw'"
    ):
        run(store, model, dataset, sanity_config(randomization="shuffle"))
