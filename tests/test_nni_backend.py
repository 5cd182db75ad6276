import builtins
import json

import pytest
import torch

import run
from algorithms.errors import PruningError
from algorithms.graph import analyze
from backends import get_backend
from models import build_model
from pipeline.data.datasets import load_dataset
from pipeline.snapshots import load_model
from tests.helpers import quick_run, relative_error, zeroed_reference, zoo

NNI = get_backend("nni")
SCRATCH = get_backend("scratch")
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", ["lenet", "vgg", "alexnet"])
def test_nni_l1_and_scratch_conv_all_select_the_same_channels(name):
    model = zoo(name)
    nni_result = NNI.prune(model, "l1", 0.5, X, scope="layer")
    scratch_result = SCRATCH.prune(model, "conv_all", 0.5, X, scope="layer")
    assert nni_result.kept == scratch_result.kept
    with torch.no_grad():
        assert relative_error(nni_result.model.eval()(X), scratch_result.model.eval()(X)) < 1e-5


@pytest.mark.parametrize(
    "name, method",
    [(n, m) for n in ("dnn_2", "lenet", "vgg", "resnet") for m in ("l1", "l2", "fpgm")]
    + [("dnn_4", "l1"), ("alexnet", "l2")],
)
def test_one_shot_pruned_model_equals_its_masked_model_zeroed_after_bn(name, method):
    model = zoo(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = NNI.prune(model, method, 0.5, X)
    assert result.physical and result.kept and type(result.model) is type(model)
    graph = analyze(model, X)
    with torch.no_grad():
        expected = zeroed_reference(model, result.kept, result.original_units, graph.norm_after, X)
        assert relative_error(result.model.eval()(X), expected) < 1e-4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model must be untouched"
    for layer, keep in result.kept.items():
        assert result.masks[layer]["weight"].flatten(1).abs().sum(1).nonzero().flatten().tolist() == keep


def test_residual_groups_are_pruned_together_without_conflict():
    result = NNI.prune(zoo("resnet"), "l1", 0.5, X)
    assert result.kept["layer2.0.conv2"] == result.kept["layer2.0.shortcut.0"] == result.kept["layer2.1.conv2"]
    assert sum(p.numel() for p in result.model.parameters()) == sum(
        p.numel() for p in SCRATCH.prune(zoo("resnet"), "conv_all", 0.5, X, scope="layer").model.parameters()
    )


def test_level_is_masked_only_and_says_so():
    model = zoo("lenet")
    result = NNI.prune(model, "level", 0.5, X)
    assert not result.physical and result.kept == {} and "dense" in result.info["note"]
    assert sum(p.numel() for p in result.model.parameters()) == sum(p.numel() for p in model.parameters())
    weight = result.model.classifier[0].weight
    assert abs(float((weight == 0).float().mean()) - 0.5) < 0.01
    with pytest.raises(PruningError, match="cannot shrink the model physically"):
        NNI.prune(model, "level", 0.5, X, physical=True)


@pytest.fixture(scope="module")
def digits_batches():
    data = load_dataset("digits")
    generator = torch.Generator().manual_seed(0)
    return data, lambda: data.batches("train", 32, generator)


@pytest.mark.parametrize("name, method", [("vgg", "l1"), ("resnet", "l1"), ("vgg", "fpgm")])
def test_round_to_rounds_nni_masks_up_to_multiples_and_stays_exact(name, method):
    model = zoo(name)
    plain = NNI.prune(model, method, 0.3, X)
    rounded = NNI.prune(model, method, 0.3, X, round_to=8)
    assert rounded.kept and rounded.info["round_to"] == 8
    for layer, keep in rounded.kept.items():
        assert len(keep) % 8 == 0 and len(keep) < rounded.original_units[layer] and set(plain.kept[layer]) <= set(keep)
        assert rounded.masks[layer]["weight"].flatten(1).abs().sum(1).nonzero().flatten().tolist() == keep
    graph = analyze(model, X)
    with torch.no_grad():
        expected = zeroed_reference(model, rounded.kept, rounded.original_units, graph.norm_after, X)
        assert relative_error(rounded.model.eval()(X), expected) < 1e-4
    if name == "resnet":  # coupled layers round together
        assert rounded.kept["layer2.0.conv2"] == rounded.kept["layer2.0.shortcut.0"] == rounded.kept["layer2.1.conv2"]


@pytest.mark.parametrize(
    "method, options", [("slim", {}), ("taylor", {}), ("agp", {}), ("linear", {"schedule_over": "taylor"})]
)
def test_data_driven_methods_prune_physically(digits_batches, method, options):
    data, batches = digits_batches
    torch.manual_seed(0)
    model = build_model("lenet", data.input_shape, 10).eval()
    result = NNI.prune(model, method, 0.5, data.example_input(4), train_batches=batches, training_steps=8, **options)
    assert result.physical and result.kept
    for layer, keep in result.kept.items():
        assert len(keep) == result.original_units[layer] // 2
    with torch.no_grad():
        assert result.model.eval()(data.example_input(4)).shape == (4, 10)
    # NNI trained its copy while scoring: the masked reference is that trained copy, masked, and the input model is
    # untouched
    masked, steps = result.info["masked_model"], result.info["train_steps"]
    assert steps == 8
    trained_weight, base_weight = masked.features[0].weight, model.features[0].weight
    assert not torch.equal(trained_weight, base_weight) and torch.equal(base_weight, build_model_seeded(data))
    for layer, keep in result.kept.items():
        pruned_rows = sorted(set(range(result.original_units[layer])) - set(keep))
        assert float(dict(masked.named_modules())[layer].weight[pruned_rows].detach().abs().sum()) == 0.0


def build_model_seeded(data):
    torch.manual_seed(0)
    return build_model("lenet", data.input_shape, 10).features[0].weight


def test_options_mean_what_they_mean_in_scratch():
    model = zoo("resnet")
    result = NNI.prune(model, "l1", {"layer1.0.conv1": 0.25, "layer3.0.conv1": 0.5}, X)
    assert {k: len(v) for k, v in result.kept.items()} == {"layer1.0.conv1": 48, "layer3.0.conv1": 128}
    excluded = NNI.prune(zoo("vgg"), "l2", 0.5, X, exclude=["features.0", "classifier"])
    assert "features.0" not in excluded.kept and "classifier.0" not in excluded.kept and "features.3" in excluded.kept
    as_nni = NNI.prune(zoo("lenet"), "l1", None, X, config_list=[{"op_names": ["features.4"], "sparse_ratio": 0.25}])
    assert {k: len(v) for k, v in as_nni.kept.items()} == {"features.4": 12}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: NNI.prune(zoo("lenet"), "magic", 0.5, X), "unknown NNI pruning method 'magic'"),
        (lambda: NNI.prune(zoo("lenet"), "taylor", 0.5, X), "taylor is data-driven: pass train_batches"),
        (lambda: NNI.prune(zoo("lenet"), "l1", 1.5, X), r"sparsity must be a fraction of channels in \[0, 1\)"),
        (lambda: NNI.prune(zoo("lenet"), "l1", 0.5, X, exclude=["nope"]), "exclude names 'nope'"),
        (lambda: NNI.prune(zoo("lenet"), "l1", {"classifier.4": 0.5}, X), "not a prunable Conv2d / hidden Linear"),
        (
            lambda: NNI.prune(build_model("dnn_2", (3, 32, 32), 10), "slim", 0.5, X, train_batches=lambda: iter(())),
            "has no BatchNorm",
        ),
        (lambda: NNI.prune(zoo("lenet"), "l1", 0.5, X, scope="global"), "removed every unit of .* use scope='layer'"),
        (
            lambda: NNI.prune(zoo("lenet"), "l1", 0.5, X, scope="model"),
            "unknown scope 'model'; choose 'global' or 'layer'",
        ),
        (
            lambda: NNI.prune(zoo("lenet"), "l1", {"features.0": 0.5}, X, scope="global"),
            "per-layer sparsity ratios cannot use scope='global'",
        ),
    ],
)
def test_bad_requests_are_clear_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


class HardCodedView(torch.nn.Module):
    """A forward that hard-codes the classifier's input width: NNI's speedup shrinks the Linear, not the view."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        return self.fc(x.view(-1, 256))


def test_a_pruned_model_that_no_longer_runs_is_refused_in_one_line():
    model = HardCodedView().eval()
    reference = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(
        PruningError, match=r"the model NNI l1 pruned no longer runs \(RuntimeError: mat1 and mat2"
    ) as raised:
        NNI.prune(model, "l1", 0.5, torch.randn(2, 3, 8, 8), scope="layer")
    assert "\n" not in str(raised.value)
    assert all(torch.equal(reference[name], tensor) for name, tensor in model.state_dict().items())  # untouched


def test_missing_nni_is_one_clear_message(monkeypatch):
    real_import = builtins.__import__

    def no_nni(name, *args, **kwargs):
        if name == "nni" or name.startswith("nni."):
            raise ImportError("No module named 'nni'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nni)
    with pytest.raises(PruningError, match=r"needs NNI 3.0 .*pip install nni==3.0 tensorboard"):
        NNI.prune(zoo("lenet"), "l1", 0.5, X)


QUICK = quick_run(limit_batches=2)


def _run_fpgm(tmp_path, monkeypatch, capfd, model):
    monkeypatch.chdir(tmp_path)
    assert run.main(["--backend", "nni", "--prune_method", "fpgm", "--model", model, "--step", "123", *QUICK]) == 0
    out, err = capfd.readouterr()
    assert "replace module" not in out + err and "Update indirect mask" not in out + err  # NNI's log stays quiet
    pruned, meta = load_model(tmp_path / f"output/snapshots/{model}/digits/model_prune", model, "digits")
    assert meta["backend"] == "nni" and meta["method"] == "fpgm"
    report = json.loads((tmp_path / f"output/results/results_{model}_digits_pruning.json").read_text())
    assert report["params"] < report["base"]["params"] and "masked_accuracy" in report
    assert (tmp_path / f"output/snapshots/{model}/digits/model_refine/weights.pt").is_file()


# resnet's (23 s here): NNI's dependency groups on residuals are checked without run.py in this file; slow
@pytest.mark.parametrize("model", ["dnn_2", "lenet", "vgg", pytest.param("resnet", marks=pytest.mark.slow)])
def test_run_py_nni_fpgm_round_trip(tmp_path, monkeypatch, capfd, model):
    _run_fpgm(tmp_path, monkeypatch, capfd, model)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dnn_4", "alexnet"])
def test_run_py_nni_fpgm_round_trip_wide_layers(tmp_path, monkeypatch, capfd, model):
    """NNI's FPGM loops in Python over units: ~100 s per 4096-wide layer here, so these run with -m slow."""
    _run_fpgm(tmp_path, monkeypatch, capfd, model)


def test_level_refine_keeps_pruned_weights_at_zero(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run.main(["--backend", "nni", "--prune_method", "level", "--step", "123", *QUICK]) == 0
    pruned, meta = load_model(tmp_path / "output/snapshots/lenet/digits/model_prune", "lenet", "digits")
    refined, _ = load_model(tmp_path / "output/snapshots/lenet/digits/model_refine", "lenet", "digits")
    assert meta["physical"] is False
    zeros = pruned.classifier[0].weight == 0
    assert 0.45 < float(zeros.float().mean()) < 0.55
    assert bool((refined.classifier[0].weight[zeros] == 0).all()) and not torch.equal(
        refined.classifier[0].weight, pruned.classifier[0].weight
    )
