"""prune -> distil -> int8 (#14): the distillation loss, step 3 with a teacher, step 4 with real int8 kernels, bad
input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import run
from algorithms.modules import clone_tree
from backends import get_backend
from models import build_model
from pipeline.data.datasets import load_dataset
from pipeline.deploy import quantize
from pipeline.deploy.metrics import model_size_mb
from pipeline.errors import UsageError
from pipeline.snapshots import load_model
from pipeline.train.distill import Distillation, FeatureDistillation, feature_layers, kd_loss
from pipeline.train.loop import evaluate, train
from pipeline.train.runtime import resolve_device
from tests.helpers import quick_run, relative_error, zoo

QUICK = quick_run(limit_batches=3)
X = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_kd_loss_is_hintons_mix_of_hard_and_soft_targets():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 10, generator=generator), torch.randn(6, 10, generator=generator)
    labels = torch.randint(0, 10, (6,), generator=generator)
    assert torch.allclose(kd_loss(student, teacher, labels, 0.0, 4.0), F.cross_entropy(student, labels))
    p_teacher = F.softmax(teacher / 4.0, dim=1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / 4.0, dim=1))).sum(1).mean()
    assert torch.allclose(kd_loss(student, teacher, labels, 1.0, 4.0), 16.0 * kl, atol=1e-6)
    assert torch.allclose(
        kd_loss(student, teacher, labels, 0.9, 4.0), 0.1 * F.cross_entropy(student, labels) + 0.9 * 16.0 * kl, atol=1e-6
    )
    # a student that matches its teacher
    assert float(kd_loss(teacher, teacher, labels, 1.0, 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_the_teacher_is_frozen_and_stays_in_eval_mode():
    teacher, student = zoo("lenet"), clone_tree(zoo("lenet"), {})
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distillation = Distillation(teacher, alpha=0.9, temperature=4.0)
    student.train()
    loss = distillation(student, X, torch.arange(8) % 10)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and any(p.grad is not None for p in student.parameters())
    # BatchNorm stats too
    assert not teacher.training and all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_post_training_int8_is_real_int8_and_close_to_fp32(name):
    model = zoo(name)
    quantized = quantize.post_training(model, [X[:4], X[4:]], X[:1])
    weights = [v for k, v in quantized.state_dict().items() if isinstance(v, torch.Tensor) and k.endswith("weight")]
    assert weights and all(w.dtype == torch.qint8 for w in weights)
    assert model_size_mb(quantized) <= 0.27 * model_size_mb(model)
    with torch.no_grad():
        assert relative_error(quantized(X), model(X)) < 0.05
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the float model is left as it was


def test_a_model_the_quantizer_cannot_trace_is_named_in_one_line():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y if y.sum() > 0 else -y

    with pytest.raises(UsageError, match="the int8 quantizer cannot prepare DataDependent: TraceError"):
        quantize.prepare(DataDependent(), "ptq", X[:1])


def test_run_py_prune_distil_int8_writes_every_stage_and_one_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run.main(["--model", "vgg", "--step", "1234", "--distill", "--percent", "0.7", *QUICK]) == 0
    table = capsys.readouterr().out
    for stage in ("1 base", "2 pruned", "3 refined (KD)", "4 int8 (ptq)"):
        assert stage in table
    assert "b1 ms" in table and "b64 ms" in table and "b64 ms NCHW" in table
    snapshots = tmp_path / "output/snapshots/vgg/digits"
    refine_meta = json.loads((snapshots / "model_refine/meta.json").read_text())
    assert refine_meta["distill"] == {"alpha": 0.9, "temperature": 4.0}
    report = json.loads((tmp_path / "output/results/results_vgg_digits_quant_model.json").read_text())
    assert report["quantize"] == "ptq" and report["quantized_from"] == "model_refine"
    assert report["modelSize"] <= 0.27 * report["float_size_mb"]
    # latency as deployed (channels_last) with the other layout beside it, each named, in every stage's results
    float_device = str(resolve_device("auto"))  # run.py's default device; int8 kernels run on the CPU
    for log_type, dtype in (
        ("base_model", "float32"),
        ("pruning", "float32"),
        ("prune_model", "float32"),
        ("quant_model", "int8"),
    ):
        timed = json.loads((tmp_path / f"output/results/results_vgg_digits_{log_type}.json").read_text())["latency"]
        assert timed["deployed_layout"] == "channels_last" and timed["dtype"] == dtype
        assert timed["device"] == (float_device if dtype == "float32" else "cpu")
        assert timed["layouts"] == {"channels_last": "channels_last (NHWC)", "contiguous": "contiguous (NCHW)"}
        assert all(timed[layout][f"b{batch}_ms"] > 0 for layout in timed["layouts"] for batch in (1, 64))
    # rebuilt from shapes, prepared, converted, int8 state loaded
    reloaded, meta = load_model(snapshots / "model_quant", "vgg", "digits")
    assert meta["stage"] == "model_quant"
    data = load_dataset("digits")
    result = evaluate(reloaded, data, 64, 1)
    assert result.top1 == pytest.approx(report["accuracy"], abs=1e-6)
    assert (tmp_path / "log/log_vgg_digits_prune_model.txt").is_file()


def test_run_py_quantization_aware_training_from_an_earlier_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run.main(["--model", "lenet", "--step", "12", *QUICK]) == 0
    assert run.main(["--model", "lenet", "--step", "4", "--quantize", "qat", "--qat_epochs", "1", *QUICK]) == 0
    report = json.loads((tmp_path / "output/results/results_lenet_digits_quant_model.json").read_text())
    assert report["quantize"] == "qat" and report["quantized_from"] == "model_prune"
    assert (tmp_path / "log/log_lenet_digits_quant_model.txt").read_text().startswith("epoch0 top_1_accuracy")
    reloaded, _ = load_model(tmp_path / "output/snapshots/lenet/digits/model_quant", "lenet", "digits")
    assert evaluate(reloaded, load_dataset("digits"), 64, 1).top1 == pytest.approx(report["accuracy"], abs=1e-6)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--step", "4"], "step 4 needs a pruned or refined model"),
        (
            ["--step", "1234", "--quantize", "qat", "--qat_epochs", "0"],
            "--quantize qat needs at least one --qat_epochs",
        ),
        (
            ["--step", "1234", "--quantize", "int4"],
            "unknown --quantize 'int4'; choose one of: ptq, qat, nni-ptq, nni-qat, nni-lsq",
        ),
        (["--step", "123", "--distill", "--kd_alpha", "1.5"], "--kd_alpha must be in [0, 1]"),
        (["--step", "123", "--distill", "--kd_temperature", "0"], "--kd_temperature must be positive"),
        (["--step", "12", "--distill"], "--distill applies to step 3"),
        (["--step", "1243"], "must list steps 1, 2, 3, 4 in increasing order"),
        (["--step", "14"], "would quantize an older pruned model"),
        (["--step", "123", "--quantize", "int4"], "unknown --quantize 'int4'"),
        (
            ["--step", "1234", "--quantize", "nni-lsq", "--qat_epochs", "0"],
            "--quantize nni-lsq needs at least one --qat_epochs",
        ),
        (["--step", "1234", "--quantize", "nni-ptq", "--calib_batches", "0"], "--calib_batches must be at least 1"),
        (
            ["--step", "123", "--kd_features"],
            "--kd_features adds feature maps to knowledge distillation; add --distill",
        ),
        (["--step", "123", "--distill", "--kd_features", "conv9"], "--kd_features names no layer 'conv9' of LeNet"),
        (
            ["--step", "123", "--distill", "--kd_features", "--kd_feature_weight", "-1"],
            "--kd_feature_weight must be non-negative",
        ),
    ],
)
def test_bad_compression_requests_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    assert run.main([*flags, "--model", "lenet", *QUICK]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "output").exists() and not (tmp_path / "log").exists()


def test_qat_refuses_a_masked_prune_it_would_undo(tmp_path, monkeypatch, capsys):
    pytest.importorskip("nni")
    monkeypatch.chdir(tmp_path)
    assert run.main(["--model", "lenet", "--step", "12", "--backend", "nni", "--prune_method", "level", *QUICK]) == 0
    capsys.readouterr()
    assert run.main(["--model", "lenet", "--step", "4", "--quantize", "qat", *QUICK]) == 2
    assert "--quantize qat would retrain the zeroed weights of level" in capsys.readouterr().err
    assert not (tmp_path / "output/snapshots/lenet/digits/model_quant").exists()


def same_state(a: nn.Module, b: nn.Module) -> bool:
    """Equal tensors under equal names (NNI re-registers a wrapped layer's parameters in another order)."""
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_nni_quantizers_simulate_int8_and_hand_over_their_calibration():
    pytest.importorskip("nni")
    from backends.nni_quantize import fake_quantize
    from pipeline.train.loop import make_optimizer

    model = zoo("vgg").eval()
    batches = [(X[:4], torch.arange(4)), (X[4:], torch.arange(4, 8))]
    with torch.no_grad():
        reference = model(X)

    def run_quantizer(mode: str) -> tuple[nn.Module, dict, torch.Tensor]:
        return fake_quantize(
            model,
            mode,
            lambda: iter(batches),
            epochs=1,
            make_optimizer=lambda params, wrap: make_optimizer("adam", params, 1e-3, wrap),
            measure=lambda simulated: simulated(X).detach(),
        )

    float_model, calibration, simulated = run_quantizer("nni-ptq")
    error = relative_error(simulated, reference)
    assert 0 < error < 0.05  # rounded to an int8 grid, in float arithmetic
    assert same_state(float_model, model)  # ptq only observes
    assert not any("_nni_wrapper" in name for name, _ in float_model.named_modules())  # handed back unwrapped
    first_conv = calibration["features.0"]
    assert (
        len(first_conv["weight"]["scale"]) == model.features[0].out_channels
        and len(first_conv["_input_0"]["scale"]) == 1
    )
    assert first_conv["weight"]["quant_dtype"] == "int8"
    json.dumps(calibration)  # goes into the snapshot's meta.json

    trained, _, _ = run_quantizer("nni-qat")
    assert not torch.equal(trained.features[0].weight, model.features[0].weight)  # QAT fine-tunes the weights
    assert same_state(model, zoo("vgg"))  # the input model is untouched


def test_run_py_nni_quantizer_row_reports_accuracy_only(tmp_path, monkeypatch, capsys):
    pytest.importorskip("nni")
    monkeypatch.chdir(tmp_path)
    assert (
        run.main(["--model", "lenet", "--step", "1234", "--quantize", "nni-ptq", "--calib_batches", "2", *QUICK]) == 0
    )
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if "4 simulated int8 (nni-ptq, accuracy only)" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert cells[header.index("size MB")] == cells[header.index("b64 ms")] == cells[header.index("samples/s")] == ""
    assert cells[header.index("top-1")] != ""
    report = json.loads((tmp_path / "output/results/results_lenet_digits_quant_model.json").read_text())
    assert (
        report["simulated"]
        and report["modelSize"] is None
        and report["reasoningTime"] is None
        and "no int8 kernel" in report["note"]
    )
    snapshots = tmp_path / "output/snapshots/lenet/digits"
    # float weights (ptq leaves them) + NNI's calibration
    reloaded, meta = load_model(snapshots / "model_quant", "lenet", "digits")
    refined, _ = load_model(snapshots / "model_refine", "lenet", "digits")
    assert meta["simulated"] and meta["calibration"] and meta["quantize"] == "nni-ptq"
    assert same_state(reloaded, refined)
    assert (tmp_path / "log/log_lenet_digits_quant_model.txt").read_text().startswith("epoch0 top_1_accuracy")


def test_feature_layers_auto_spreads_over_depth_and_leaves_out_the_classifier():
    model = zoo("vgg")
    layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    chosen = feature_layers(model, "auto")
    assert len(chosen) == 4 and chosen[-1] == layers[-2] and layers[-1] not in chosen
    assert [layers.index(name) for name in chosen] == sorted(layers.index(name) for name in chosen)
    assert (
        feature_layers(zoo("lenet"), "auto")
        == [n for n, m in zoo("lenet").named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    )
    assert feature_layers(model, "features.0, classifier.0") == ["features.0", "classifier.0"]


def test_feature_distillation_adds_the_projected_mse_and_trains_its_projections():
    data = load_dataset("digits")
    torch.manual_seed(0)
    teacher = build_model("vgg", data.input_shape, data.num_classes).eval()
    images = data.example_input(8)
    student = get_backend("scratch").prune(teacher, "conv_all", 0.5, images[:2]).model
    layers = feature_layers(student, "auto")
    loss_fn = FeatureDistillation.build(teacher, student, layers, images[:1], alpha=0.9, temperature=4.0, weight=0.5)
    widths = {
        name: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
        for name, m in student.named_modules()
        if name in layers
    }
    for name in layers:
        projection = loss_fn.projections[name.replace(".", "/")]
        teacher_width = dict(teacher.named_modules())[name].weight.shape[0]
        assert (
            isinstance(projection, nn.Identity)
            if widths[name] == teacher_width
            else projection.weight.shape[:2] == (teacher_width, widths[name])
        )
    labels = torch.arange(8) % 10
    student.train()
    loss = loss_fn(student, images, labels)
    # by hand: the logit term plus weight x the mean of the per-layer MSEs through the projections
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, n=n: captured.__setitem__(n, out.clone()))
        for n, m in student.named_modules()
        if n in layers
    ]
    student_logits = student(images)
    for hook in hooks:
        hook.remove()
    wanted: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, n=n: wanted.__setitem__(n, out.clone()))
        for n, m in teacher.named_modules()
        if n in layers
    ]
    with torch.no_grad():
        teacher_logits = teacher(images)
    for hook in hooks:
        hook.remove()
    mse = torch.stack(
        [F.mse_loss(loss_fn.projections[n.replace(".", "/")](captured[n]), wanted[n]) for n in layers]
    ).mean()
    assert torch.allclose(loss, kd_loss(student_logits, teacher_logits, labels, 0.9, 4.0) + 0.5 * mse, atol=1e-5)
    # hooks live only during a call
    assert not student._forward_hooks and all(not m._forward_hooks for m in teacher.modules())
    # the layers' own outputs, before the in-place ReLU that follows them
    assert any(bool((wanted[n] < 0).any()) for n in layers)
    projections = {k: v.clone() for k, v in loss_fn.projections.state_dict().items()}
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert projections  # conv_all 0.5 narrows these layers: there is something to learn
    train(
        student,
        data,
        epochs=1,
        batch_size=16,
        val_batch_size=64,
        lr=1e-3,
        optimizer_name="adam",
        seed=0,
        limit_batches=2,
        limit_val_batches=1,
        loss_fn=loss_fn,
    )
    assert all(not torch.equal(projections[k], v) for k, v in loss_fn.projections.state_dict().items())
    # the teacher is never trained, BatchNorm stats included
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())


def test_run_py_feature_distillation_records_its_layers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run.main(["--model", "lenet", "--step", "123", "--distill", "--kd_features", *QUICK]) == 0
    assert "3 refined (KD + features)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "output/snapshots/lenet/digits/model_refine/meta.json").read_text())
    assert (
        meta["distill"]["features"] == feature_layers(zoo("lenet"), "auto") and meta["distill"]["feature_weight"] == 1.0
    )
