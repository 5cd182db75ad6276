"""analyze.py end to end on snapshots run.py writes: files, figures, verification, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

import analyze
import run
from algorithms import ChannelDependency, load_sensitivity
from algorithms.masks import unit_masks
from pipeline.analysis.inputs import open_snapshot
from pipeline.data.datasets import load_dataset
from pipeline.deploy.metrics import count_macs, count_params, deployable
from pipeline.train.loop import evaluate

ROOT = Path(__file__).resolve().parents[1]
BASE = "output/snapshots/lenet/digits/model_base"
PRUNED = "output/snapshots/lenet/digits/model_prune"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A lenet trained briefly on digits and pruned (conv_all 0.5), written by run.py itself."""
    root = tmp_path_factory.mktemp("analyze")
    cwd = Path.cwd()
    try:
        os.chdir(root)
        assert (
            run.main(
                [
                    "--model",
                    "lenet",
                    "--step",
                    "12",
                    "--num_epochs",
                    "1",
                    "--prune_method",
                    "conv_all",
                    "--prune_scope",
                    "layer",
                ]
            )
            == 0
        )
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def workdir(trained, tmp_path, monkeypatch):
    shutil.copytree(trained / "output", tmp_path / "output")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_sensitivity_writes_nni_csv_plot_and_settings(workdir, capsys):
    assert (
        analyze.main(
            ["sensitivity", "--model", "lenet", "--sparsities", "0.25,0.5,0.75", "--mode", "both", "--max_loss", "0.05"]
        )
        == 0
    )
    out = workdir / "output/sensitivity/lenet/digits"
    pruned, masked = load_sensitivity(out / "sensitivity.csv"), load_sensitivity(out / "sensitivity_masked.csv")
    assert list(pruned) == ["features.0", "features.4", "classifier.0", "classifier.2"] == list(masked)
    assert all(list(row) == [0.25, 0.5, 0.75] for row in pruned.values())
    settings = json.loads((out / "sensitivity.json").read_text())
    data = load_dataset("digits")
    assert settings["baseline"] == evaluate(open_snapshot(BASE).model, data, 256).top1
    assert set(settings["ratios"]) == set(pruned) and settings["skipped"] == {
        "classifier.4": "it reaches the model output"
    }
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "pruned model, top-1" in printed and "masked model, top-1" in printed
    assert "largest ratios within a loss of 0.05" in printed and all(
        f"| {layer} " in printed for layer in settings["ratios"]
    )

    assert analyze.main(["sensitivity", "--from_csv", str(out / "sensitivity.csv"), "--max_loss", "0.05"]) == 0
    assert json.loads((out / "ratios.json").read_text())["ratios"] == settings["ratios"]


def test_sensitivity_early_stop_and_specified_layers(workdir):
    argv = [
        "sensitivity",
        "--model",
        "lenet",
        "--specified_layers",
        "features.4",
        "--early_stop_mode",
        "minimize",
        "--early_stop_value",
        "2",
        "--outdir",
        "s",
    ]
    assert analyze.main(argv) == 0
    rows = load_sensitivity(workdir / "s/sensitivity.csv")
    # every accuracy is < 2: stops after the first point
    assert list(rows) == ["features.4"] and list(rows["features.4"]) == [0.1]


def test_dependency_writes_nnis_csv(workdir, capsys):
    assert analyze.main(["dependency", "--model", "resnet", "--out", "dep.csv", "--groups_out", "groups.csv"]) == 0
    from models import build_model

    expected = ChannelDependency(build_model("resnet", (1, 32, 32), 10).eval(), torch.zeros(1, 1, 32, 32))
    assert (workdir / "dep.csv").read_text() == expected.export(workdir / "expected.csv").read_text()
    assert (workdir / "groups.csv").read_text().splitlines()[0] == "Conv Layer Name,Group"
    assert "layer2.0.conv2, layer2.0.shortcut.0, layer2.1.conv2" in capsys.readouterr().out


def test_conflict_fixes_a_masks_file(workdir, capsys):
    from models import build_model

    model = build_model("resnet", (1, 32, 32), 10)
    modules = dict(model.named_modules())
    masks = {
        "layer2.0.conv2": unit_masks(modules["layer2.0.conv2"], range(64)),
        "layer2.1.conv2": unit_masks(modules["layer2.1.conv2"], range(64, 128)),
    }
    torch.save(masks, workdir / "masks.pt")
    assert analyze.main(["conflict", "--model", "resnet", "--masks", "masks.pt", "--out", "fixed.pt"]) == 0
    fixed = torch.load(workdir / "fixed.pt", weights_only=True)
    assert all(bool((fixed[name]["weight"] != 0).all()) for name in masks)  # the union of the two halves is everything
    assert "fixed" in capsys.readouterr().out


def test_stats_side_by_side_uses_the_shared_counter(workdir, capsys):
    assert analyze.main(["stats", "--snapshot", BASE, "--compare", PRUNED, "--csv", "stats.csv"]) == 0
    base, pruned = open_snapshot(BASE).model, open_snapshot(PRUNED).model
    example = torch.zeros(1, 1, 32, 32)
    printed = capsys.readouterr().out
    assert (
        f"params base {count_params(base):,}" in printed and f"macs pruned {count_macs(pruned, example):,}" in printed
    )
    import pandas as pd

    table = pd.read_csv(workdir / "stats.csv")
    conv = table.set_index("name").loc["features.0"]
    assert conv["weight_shape base"] == "6x1x5x5" and conv["weight_shape pruned"] == "3x1x5x5"
    assert table["macs base"].sum() == count_macs(base, example) and table["macs pruned"].sum() == count_macs(
        pruned, example
    )


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_is_verified_and_exports_the_smaller_model(workdir, capsys, fmt):
    assert analyze.main(["export", "--format", fmt, "--snapshot", PRUNED, "--out", f"exported/m.{fmt}"]) == 0
    assert "outputs match PyTorch on 16 test images" in capsys.readouterr().out
    pruned = open_snapshot(PRUNED).model
    data = load_dataset("digits")
    batch = data.normalize(data.test_images[:32])
    if fmt == "onnx":
        graph = onnx.load(workdir / "exported/m.onnx").graph
        # the exporter folds BatchNorm into the conv before it, as pipeline.deploy.metrics.deployable does
        assert sum(int(torch.tensor(list(t.dims)).prod()) for t in graph.initializer) == count_params(
            deployable(pruned)
        )
        import onnxruntime

        produced = torch.from_numpy(
            onnxruntime.InferenceSession(str(workdir / "exported/m.onnx")).run(None, {"input": batch.numpy()})[0]
        )
    else:
        produced = torch.jit.load(workdir / "exported/m.torchscript")(batch)
    with torch.no_grad():
        assert torch.allclose(produced, pruned(batch), atol=1e-4, rtol=1e-4)  # another batch size than the export's


def test_export_masks_select_the_kept_channels(workdir):
    assert analyze.main(["export", "--format", "masks", "--snapshot", PRUNED, "--out", "masks.pt"]) == 0
    masks = torch.load(workdir / "masks.pt", weights_only=True)
    kept = json.loads((workdir / PRUNED / "meta.json").read_text())["kept"]
    assert set(masks) == set(kept)
    assert all(
        (masks[n]["weight"].flatten(1) != 0).any(1).nonzero().flatten().tolist() == units for n, units in kept.items()
    )
    assert masks["features.0"]["weight"].shape == (6, 1, 5, 5)  # over the unpruned architecture


def half_written(workdir: Path) -> str:
    shutil.copytree(workdir / BASE, workdir / "half")
    (workdir / "half/weights.pt").unlink()
    return "half"


def truncated(workdir: Path) -> str:
    shutil.copytree(workdir / BASE, workdir / "cut")
    weights = workdir / "cut/weights.pt"
    weights.write_bytes(weights.read_bytes()[:200])
    return "cut"


def not_sensitivity(workdir: Path) -> str:
    (workdir / "table.csv").write_text("name,value\nx,1\n")
    return "table.csv"


def foreign_masks(workdir: Path) -> str:
    torch.save({"conv99": {"weight": torch.ones(3, 3)}}, workdir / "foreign.pt")
    return "foreign.pt"


def misshapen_masks(workdir: Path) -> str:
    torch.save({"features.0": {"weight": torch.ones(5, 1, 5, 5)}}, workdir / "misshapen.pt")
    return "misshapen.pt"


@pytest.mark.parametrize(
    ("argv", "prepare", "message"),
    [
        (["sensitivity", "--model", "lenet", "--sparsities", "0.5,1.5", "--outdir", "X"], None, "outside (0, 1)"),
        (
            ["sensitivity", "--model", "lenet", "--sparsities", "a,b", "--outdir", "X"],
            None,
            "not comma-separated fractions",
        ),
        (["sensitivity", "--model", "lenet", "--early_stop_mode", "lowest", "--outdir", "X"], None, "invalid choice"),
        (
            ["sensitivity", "--model", "lenet", "--early_stop_mode", "dropped", "--outdir", "X"],
            None,
            "needs early_stop_value",
        ),
        (
            ["sensitivity", "--model", "lenet", "--prune_method", "taylor", "--outdir", "X"],
            None,
            "unknown pruning method",
        ),
        (
            ["sensitivity", "--model", "lenet", "--specified_layers", "nope", "--outdir", "X"],
            None,
            "cannot be analysed",
        ),
        (["sensitivity", "--model", "vgg", "--outdir", "X"], None, "no snapshot in"),
        (["sensitivity", "--snapshot", "{}", "--outdir", "X"], half_written, "no snapshot in"),
        (["sensitivity", "--snapshot", "{}", "--outdir", "X"], truncated, "unreadable"),
        (
            ["sensitivity", "--from_csv", "{}", "--max_loss", "0.1", "--outdir", "X"],
            not_sensitivity,
            "not a sensitivity CSV",
        ),
        (["conflict", "--model", "lenet", "--masks", "{}", "--out", "X"], foreign_masks, "does not have"),
        (["conflict", "--model", "lenet", "--masks", "{}", "--out", "X"], misshapen_masks, "has shape"),
        (["export", "--format", "masks", "--snapshot", BASE, "--out", "X"], None, "holds no pruning"),
        (["export", "--format", "pdf", "--snapshot", BASE, "--out", "X"], None, "invalid choice"),
        (["stats", "--snapshot", "missing/dir"], None, "no snapshot in"),
        (["dependency"], None, "--snapshot <dir> or --model"),
        (
            ["sensitivity", "--model", "lenet", "--outdir", "{}"],
            lambda w: (w / "taken").write_text("x") and "taken",
            "is a file, not a directory",
        ),
        (["sensitivity", "--model", "lenet", "--max_loss", "nan", "--outdir", "X"], None, "finite, non-negative"),
        (
            [
                "sensitivity",
                "--model",
                "lenet",
                "--early_stop_mode",
                "dropped",
                "--early_stop_value",
                "inf",
                "--outdir",
                "X",
            ],
            None,
            "finite number",
        ),
        (
            ["sensitivity", "--model", "lenet", "--baseline", "0.9", "--outdir", "X"],
            None,
            "--baseline goes with --from_csv",
        ),
        (
            ["conflict", "--model", "lenet", "--masks", "{}", "--out", "X"],
            lambda w: torch.save({"features.1": {"weight": torch.ones(6)}}, w / "bn.pt") or "bn.pt",
            "channel masks cover Conv2d and Linear",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(workdir, capsys, argv, prepare, message):
    if prepare is not None:
        made = prepare(workdir)
        argv = [a.replace("{}", made) for a in argv]
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    try:
        code = analyze.main(argv)
    except SystemExit as stop:  # argparse's own refusals (unknown choice) exit from parse_args
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and err.startswith("error:")
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


def test_cli_process_prints_no_traceback(workdir):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "analyze.py"),
            "export",
            "--format",
            "onnx",
            "--snapshot",
            "nowhere",
            "--out",
            "x.onnx",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert (
        done.returncode == 2
        and "Traceback" not in done.stderr
        and done.stderr.startswith("error: no snapshot in nowhere")
    )


def test_an_export_that_fails_is_one_line_exit_1_and_leaves_nothing(workdir, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError(
            "Exporting the operator 'aten::magic' to ONNX opset version 18 is not supported.\nmore detail"
        )

    monkeypatch.setattr(torch.onnx, "export", broken)
    assert analyze.main(["export", "--format", "onnx", "--snapshot", PRUNED, "--out", "new/dir/m.onnx"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("error: ONNX export failed: Exporting the operator 'aten::magic'")
        and len(err.strip().splitlines()) == 1
    )
    assert not (workdir / "new").exists()
