"""SensitivityAnalysis: NNI's API and CSV, on the physically pruned model, exact with upstream reuse."""

from __future__ import annotations

import csv

import pytest
import torch
import torchvision
from torch import nn

from algorithms import SensitivityAnalysis, get_ratios_by_loss, load_sensitivity, prune_channels
from algorithms.criteria import geometric_median_distance, unit_sum
from algorithms.errors import PruningError
from algorithms.masks import apply_masks
from algorithms.sensitivity import PRUNE_TYPES, should_stop
from backends import get_backend
from pipeline.deploy.metrics import count_params
from tests.helpers import zoo

BATCHES = [torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]


@torch.no_grad()
def logit_sum(model: nn.Module) -> float:
    """A metric that moves with every weight: any change of the evaluated model changes it."""
    model.eval()
    return float(sum(model(x).double().sum() for x in BATCHES))


def param_millions(model: nn.Module) -> float:
    return count_params(model) / 1e6


def scan(model: nn.Module, reuse: bool, **settings: object) -> SensitivityAnalysis:
    analysis = SensitivityAnalysis(model, logit_sum, reuse_upstream=reuse, progress=False, **settings)
    analysis.analysis(val_args=[model])
    return analysis


@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_upstream_reuse_gives_the_straightforward_numbers_to_the_last_digit(name):
    model = zoo(name)
    fast, plain = scan(model, True, sparsities=[0.3, 0.7]), scan(model, False, sparsities=[0.3, 0.7])
    assert fast.sensitivities == plain.sensitivities
    assert fast.cache_hits > 0 and plain.cache_hits == 0  # later sparsities of a unit really reused the frontier
    assert len(fast.sensitivities) == len(fast.units) and all(len(row) == 2 for row in fast.sensitivities.values())


@pytest.mark.parametrize("recorded", [True, False])
def test_upstream_reuse_is_exact_with_in_place_ops_and_shared_modules(recorded):
    """torchvision's resnet18: ReLU(inplace=True) called several times per block, and `out += identity`."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    layers = ["layer1.0.conv1", "layer2.0.conv2", "layer3.1.conv1", "layer4.0.conv1"]
    example = {"example_input": BATCHES[0][:1]} if recorded else {}
    fast = scan(model, True, sparsities=[0.25, 0.5], **example)
    plain = scan(model, False, sparsities=[0.25, 0.5], **example)
    assert fast.sensitivities == plain.sensitivities
    # with example_input the baseline run recorded every unit's upstream values; without, each unit computes them once.
    # The stem unit (conv1 and layer1's residual set) starts at the input: nothing upstream, so it runs whole.
    assert fast.cache_hits == (2 if recorded else 1) * len(BATCHES) * (len(fast.units) - 1)
    chosen = SensitivityAnalysis(model, logit_sum, sparsities=[0.5], progress=False).analysis(
        val_args=[model], specified_layers=layers
    )
    assert (
        set(chosen) == {unit for unit, members in fast.units.items() if set(layers) & set(members)} and len(chosen) == 4
    )
    assert all(chosen[unit][0.5] == fast.sensitivities[unit][0.5] for unit in chosen)


def test_each_point_is_the_physically_pruned_model_and_the_model_is_untouched():
    model = zoo("vgg")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[nn.Module] = []

    def metric(candidate: nn.Module, scale: float = 1.0) -> float:
        seen.append(candidate)
        return logit_sum(candidate) * scale

    analysis = SensitivityAnalysis(model, metric, sparsities=[0.5], progress=False)
    result = analysis.analysis(val_kwargs={"candidate": model, "scale": 2.0}, specified_layers=["features.3"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(candidate is not model for candidate in seen)
    expected = prune_channels(model, "conv_all", {"features.3": 0.5}, BATCHES[0][:1], scope="layer").model
    assert result == {"features.3": {0.5: logit_sum(expected) * 2.0}}
    assert analysis.ori_metric == logit_sum(model) * 2.0


def test_masked_mode_is_nnis_way_and_differs_where_batchnorm_beta_leaks():
    model = zoo("vgg")
    pruned, masked = (
        scan(model, True, sparsities=[0.5], mode=mode).sensitivities["features.3"][0.5] for mode in ("pruned", "masked")
    )
    result = prune_channels(model, "conv_all", {"features.3": 0.5}, BATCHES[0][:1], scope="layer")
    assert masked == logit_sum(apply_masks(model, result.masks))  # conv weights and bias zeroed, BatchNorm untouched
    assert pruned == logit_sum(result.model)
    assert pruned != masked  # the random BatchNorm shifts of the zoo fixture keep feeding the masked channels


def test_coupled_layers_form_one_unit_named_by_its_members():
    analysis = scan(zoo("resnet"), True, sparsities=[0.5])
    assert "conv1+layer1.0.conv2+layer1.1.conv2" in analysis.sensitivities
    assert analysis.units["layer2.0.conv2+layer2.0.shortcut.0+layer2.1.conv2"] == [
        "layer2.0.conv2",
        "layer2.0.shortcut.0",
        "layer2.1.conv2",
    ]
    assert analysis.skipped == {"linear": "it reaches the model output"}


@pytest.mark.parametrize(
    ("mode", "value", "metric"),
    [
        ("minimize", 14.0, param_millions),
        ("maximize", -14.0, lambda m: -param_millions(m)),
        ("dropped", 0.6, param_millions),
        ("raised", 0.6, lambda m: -param_millions(m)),
    ],
)
def test_early_stop_modes_cut_the_row_where_nni_did(mode, value, metric):
    model = zoo("vgg")  # 14.8 M params; each 0.1 of features.40 (with its reader classifier.0) removes ~0.24 M
    analysis = SensitivityAnalysis(
        model, metric, early_stop_mode=mode, early_stop_value=value, progress=False, example_input=BATCHES[0][:1]
    )
    row = analysis.analysis(val_args=[model], specified_layers=["features.40"])["features.40"]
    full = SensitivityAnalysis(model, metric, progress=False, example_input=BATCHES[0][:1]).analysis(
        val_args=[model], specified_layers=["features.40"]
    )["features.40"]
    expected = []
    for sparsity, value_at in full.items():
        expected.append(sparsity)
        if should_stop(mode, value, analysis.ori_metric, value_at):
            break
    assert 1 < len(expected) < 9
    assert row == {s: full[s] for s in expected}


def test_should_stop_follows_nnis_definitions():
    assert should_stop("minimize", 0.5, 0.9, 0.49) and not should_stop("minimize", 0.5, 0.9, 0.5)
    assert should_stop("maximize", 0.5, 0.9, 0.51) and not should_stop("maximize", 0.5, 0.9, 0.5)
    assert should_stop("dropped", 0.1, 0.9, 0.79) and not should_stop("dropped", 0.1, 0.9, 0.81)
    assert should_stop("raised", 0.1, 0.9, 1.01) and not should_stop("raised", 0.1, 0.9, 0.99)
    assert not should_stop(None, None, 0.9, 0.0)


def test_csv_is_nnis_layout_and_loads_back(tmp_path):
    sensitivity = {"conv1": {0.1: 0.9, 0.2: 0.85, 0.3: 0.5}, "a+b": {0.1: 0.91}}
    from algorithms import export_sensitivity

    path = export_sensitivity(sensitivity, tmp_path / "s.csv")
    rows = list(csv.reader(path.open()))
    assert rows == [["layername", "0.1", "0.2", "0.3"], ["conv1", "0.9", "0.85", "0.5"], ["a+b", "0.91"]]
    assert load_sensitivity(path) == sensitivity


def test_csv_header_holds_the_configured_grid_at_full_precision_and_rows_are_prefixes(tmp_path):
    from algorithms import export_sensitivity

    path = export_sensitivity(
        {"a": {0.1234561: 1.0, 0.1234564: 0.5}, "b": {0.1234561: 0.7}}, tmp_path / "s.csv", [0.1234561, 0.1234564, 0.9]
    )
    assert path.read_text().splitlines()[0] == "layername,0.1234561,0.1234564,0.9"
    assert load_sensitivity(path) == {"a": {0.1234561: 1.0, 0.1234564: 0.5}, "b": {0.1234561: 0.7}}
    with pytest.raises(PruningError, match="not a prefix"):
        export_sensitivity({"a": {0.1: 1.0, 0.3: 0.5}, "b": {0.2: 0.7}}, tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()


@pytest.mark.parametrize(
    "text",
    [
        "name,0.1\nconv1,0.9\n",
        "layername,0.1,1.5\nconv1,0.9,0.8\n",
        "layername,0.1\nconv1,abc\n",
        "layername,0.2,0.1\nc,1,1\n",
        "",
        "layername\n",
    ],
)
def test_a_csv_that_is_not_a_sensitivity_csv_is_refused(tmp_path, text):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(PruningError, match="not a sensitivity CSV"):
        load_sensitivity(path)


def test_ratios_by_loss_interpolate_between_measured_points_and_prune_accepts_them():
    sensitivity = {
        "features.0": {0.2: 0.90, 0.4: 0.88, 0.6: 0.70},
        "features.3+features.7": {0.2: 0.80, 0.4: 0.60},
        "features.10": {0.2: 0.91, 0.4: 0.90},
    }
    ratios = get_ratios_by_loss(sensitivity, 0.05, baseline=0.91)
    # features.0: loss 0.03 at 0.4, 0.21 at 0.6 -> 0.4 + (0.05 - 0.03) * 0.2 / 0.18
    assert ratios["features.0"] == pytest.approx(0.4 + 0.02 * 0.2 / 0.18, abs=1e-6)
    # the coupled unit is over budget at its first point: between (0, 0) and (0.2, 0.11)
    assert ratios["features.3"] == ratios["features.7"] == pytest.approx(0.2 * 0.05 / 0.11, abs=1e-6)
    assert ratios["features.10"] == 0.4  # within budget at every point: the last one, no extrapolation
    result = get_backend("scratch").prune(zoo("vgg"), "conv_all", ratios, BATCHES[0][:1])
    assert len(result.kept["features.0"]) == 64 - int(64 * ratios["features.0"])
    with pytest.raises(PruningError, match="baseline"):
        get_ratios_by_loss(sensitivity, 0.05)
    with pytest.raises(PruningError, match="non-negative"):
        get_ratios_by_loss(sensitivity, -0.1, baseline=0.9)


def test_ratios_by_loss_read_the_curve_from_zero_upwards():
    # over budget at 0.2, back within at 0.4
    ratios = get_ratios_by_loss({"a": {0.2: 0.70, 0.4: 0.89, 0.6: 0.5}}, 0.05, baseline=0.9)
    assert ratios["a"] == pytest.approx(0.2 * 0.05 / 0.2)
    with pytest.raises(PruningError, match="finite"):
        get_ratios_by_loss({"a": {0.2: 0.7}}, 0.05, baseline=float("nan"))


def test_namedtuple_arguments_get_the_pruned_model_too():
    from collections import namedtuple

    Args = namedtuple("Args", "model scale")
    model = zoo("lenet")
    seen = []
    analysis = SensitivityAnalysis(
        model,
        lambda packed: seen.append(packed.model) or logit_sum(packed.model) * packed.scale,
        sparsities=[0.5],
        progress=False,
    )
    analysis.analysis(val_args=[Args(model, 2.0)], specified_layers=["features.0"])
    assert len(seen) == 2 and seen[0] is not model and seen[1] is not model


def test_the_plot_takes_many_units(tmp_path):
    from pipeline.analysis.sensitivity_plot import plot_sensitivity

    many = {f"layer{i}": {0.1: 0.9 - i / 100, 0.5: 0.5} for i in range(45)}
    assert plot_sensitivity({"pruned": many}, 0.9, tmp_path / "p.png", "45 units").read_bytes()[:4] == b"\x89PNG"


def test_ratios_by_loss_from_an_analysis_use_its_original_metric():
    model = zoo("vgg")
    analysis = SensitivityAnalysis(
        model, param_millions, sparsities=[0.25, 0.5], progress=False, example_input=BATCHES[0][:1]
    )
    analysis.analysis(val_args=[model], specified_layers=["features.40", "features.37"])
    ratios = get_ratios_by_loss(analysis, 0.0)
    assert ratios == {"features.37": 0.0, "features.40": 0.0}  # any channel removed loses parameters
    assert get_ratios_by_loss(analysis, 100.0) == {"features.37": 0.5, "features.40": 0.5}


def test_nni_prune_type_names_rank_as_nni_does():
    weight = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(PRUNE_TYPES["l1"].score(weight), unit_sum(weight))
    assert torch.allclose(PRUNE_TYPES["l2"].score(weight), weight.flatten(1).double().norm(dim=1))
    distances = torch.stack([sum((weight[i] - weight[j]).double().norm() for j in range(8)) for i in range(8)])
    assert torch.allclose(geometric_median_distance(weight), distances)
    model = zoo("vgg")
    l1 = SensitivityAnalysis(model, logit_sum, sparsities=[0.5], prune_type="l1", progress=False).analysis(
        [model], specified_layers=["features.7"]
    )
    conv_all = SensitivityAnalysis(model, logit_sum, sparsities=[0.5], progress=False).analysis(
        [model], specified_layers=["features.7"]
    )
    assert l1 == conv_all


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sparsities": [0.5, 1.0]}, "outside \\(0, 1\\)"),
        ({"sparsities": [0.0]}, "outside"),
        ({"early_stop_mode": "lower", "early_stop_value": 1}, "unknown early_stop_mode"),
        ({"early_stop_mode": "dropped"}, "needs early_stop_value"),
        ({"prune_type": "taylor"}, "unknown pruning method"),
        ({"mode": "fake"}, "unknown mode"),
    ],
)
def test_bad_settings_are_refused_up_front(settings, message):
    with pytest.raises(PruningError, match=message):
        SensitivityAnalysis(zoo("vgg"), logit_sum, **settings)


def test_a_val_func_that_does_not_receive_the_model_is_refused():
    model = zoo("lenet")
    analysis = SensitivityAnalysis(model, lambda: logit_sum(model), progress=False)
    with pytest.raises(PruningError, match="val_args or val_kwargs"):
        analysis.analysis()
    with pytest.raises(PruningError, match="cannot be analysed"):
        SensitivityAnalysis(model, logit_sum, progress=False).analysis([model], specified_layers=["nonexistent"])


# -- upstream reuse must never change a number: models built to break it (from an independent review) -----------------
class Base(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


class WritesAfterRead(Base):  # torch.relu_ changes y after c2 read it
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        z = self.c2(y)
        torch.relu_(y)
        return self.head(self.c3(z) + y)


class AliasThroughModule(Base):  # Identity returns its input; the in-place ReLU then changes y
    def __init__(self, alias: nn.Module) -> None:
        super().__init__()
        self.alias, self.act = alias, nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        z = self.c2(y)
        return self.head(self.c3(z) + self.act(self.alias(y)))


class DownstreamWriteThenUpstreamRead(Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c1(x)
        y.add_(self.c2(x[:, :1].expand(-1, 8, -1, -1).contiguous()))
        return self.head(self.c3(y * 2))


class MutatesItsInput(Base):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(0.5)
        return self.head(self.c2(torch.relu(self.c1(x))))


class TrainFlagInForward(Base):  # fx bakes self.training into the graph
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.dropout(torch.relu(self.c2(torch.relu(self.c1(x)))), 0.5, self.training)
        return self.head(x)


class ReturnsFeatures(Base):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.c1(x))
        return self.head(self.c2(features)), features


SMALL = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]
TRICKY = {
    "writes after read": WritesAfterRead,
    "Identity alias": lambda: AliasThroughModule(nn.Identity()),
    "Dropout alias": lambda: AliasThroughModule(nn.Dropout(0.3)),
    "downstream write, upstream read": DownstreamWriteThenUpstreamRead,
    "mutates its input": MutatesItsInput,
    "train flag in forward": TrainFlagInForward,
    "returns features": ReturnsFeatures,
}


def small_metric(model: nn.Module) -> float:
    """Evaluates in eval mode on fresh copies of the batches, and scribbles on what the model returns."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for x in SMALL:
            out = model(x.clone())
            logits = out[0] if isinstance(out, tuple) else out
            total += float(logits.double().sum()) + (float(out[1].double().sum()) if isinstance(out, tuple) else 0.0)
            if isinstance(out, tuple):
                out[1].zero_()  # a caller changing a returned tensor must not change the next evaluation
    return total


@pytest.mark.parametrize("case", TRICKY)
@pytest.mark.parametrize("with_example", [True, False])
def test_upstream_reuse_stays_exact_on_models_built_to_break_it(case, with_example):
    torch.manual_seed(0)
    model = TRICKY[case]()  # left in training mode, as constructed
    example = {"example_input": SMALL[0][:1]} if with_example else {}
    results = [
        SensitivityAnalysis(
            model, small_metric, sparsities=[0.25, 0.5], reuse_upstream=reuse, progress=False, **example
        )
        for reuse in (True, False)
    ]
    fast, plain = (analysis.analysis(val_args=[model]) for analysis in results)
    assert fast == plain and results[0].ori_metric == results[1].ori_metric


def test_a_val_func_that_fine_tunes_gets_the_plain_forward():
    """Training inside val_func (gradients on) changes upstream weights: reuse must step aside, not serve stale
    values."""
    torch.manual_seed(0)
    model = ReturnsFeatures().eval()

    def fine_tuned(candidate: nn.Module) -> float:
        optimizer = torch.optim.SGD(candidate.parameters(), lr=0.1)
        loss = sum(candidate(x)[0].pow(2).sum() for x in SMALL)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return small_metric(candidate)

    results = [
        SensitivityAnalysis(
            model, fine_tuned, sparsities=[0.25, 0.5], reuse_upstream=reuse, example_input=SMALL[0][:1], progress=False
        )
        for reuse in (True, False)
    ]
    assert results[0].analysis(val_args=[model]) == results[1].analysis(val_args=[model])


def test_a_model_copied_during_evaluation_is_refused_not_silently_wrong():
    model = zoo("lenet")

    def copies(candidate: nn.Module) -> float:
        import copy

        return logit_sum(copy.deepcopy(candidate))

    with pytest.raises(PruningError, match="reuse_upstream=False"):
        SensitivityAnalysis(model, copies, sparsities=[0.5], progress=False).analysis(
            [model], specified_layers=["features.4"]
        )
    assert SensitivityAnalysis(model, copies, sparsities=[0.5], reuse_upstream=False, progress=False).analysis(
        [model], specified_layers=["features.4"]
    )
    # the first layer reads the input: nothing upstream to reuse, so its unit runs whole and a copying val_func is fine
    assert SensitivityAnalysis(model, copies, sparsities=[0.5], progress=False).analysis(
        [model], specified_layers=["features.0"]
    )
