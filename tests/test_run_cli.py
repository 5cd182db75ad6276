import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run
from backends import get_backend
from models import build_model
from pipeline.data.datasets import load_dataset
from pipeline.snapshots import load_model, load_snapshot, save_snapshot
from tests.helpers import quick_run

ROOT = Path(__file__).resolve().parents[1]
QUICK = quick_run(limit_batches=3)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_step1_trains_logs_and_snapshots_deterministically(workdir, capsys):
    assert run.main(["--step", "1", *QUICK]) == 0
    snapshot = workdir / "output/snapshots/lenet/digits/model_base"
    state, meta = load_snapshot(snapshot)
    assert meta["model"] == "lenet" and meta["input_shape"] == [1, 32, 32] and meta["num_classes"] == 10
    log = (workdir / "log/log_lenet_digits_base_model.txt").read_text().splitlines()
    assert (
        len(log) == 1
        and log[0].startswith("epoch0 top_1_accuracy: ")
        and "top_k_accuracy: " in log[0]
        and "samples/s: " in log[0]
    )
    results = json.loads((workdir / "output/results/results_lenet_digits_base_model.json").read_text())
    assert {"accuracy", "top_k_accuracy", "top_k", "modelSize", "reasoningTime", "params", "macs"} <= set(results)
    assert results["params"] == 61_750 and results["top_k"] == 5
    assert "| 1 base" in capsys.readouterr().out
    assert run.main(["--step", "1", *QUICK, "--model_save_dir", "again"]) == 0
    again, _ = load_snapshot(workdir / "again/model_base")
    assert all(torch.equal(state[k], again[k]) for k in state), "same --seed must give the same weights"


def test_step3_refines_a_prune_snapshot_written_by_the_test(workdir):
    data = load_dataset("digits")
    model = build_model("lenet", data.input_shape, data.num_classes).eval()
    pruned = get_backend("scratch").prune(model, "conv_all", 0.5, data.example_input(2), scope="layer").model
    meta = {
        "model": "lenet",
        "data_type": "digits",
        "input_shape": [1, 32, 32],
        "num_classes": 10,
        "stage": "model_prune",
    }
    save_snapshot(workdir / "snaps/model_prune", pruned, meta)
    assert run.main(["--step", "3", "--model_load_dir", "snaps", "--model_save_dir", "snaps", *QUICK]) == 0
    refined, refined_meta = load_model(workdir / "snaps/model_refine", "lenet", "digits")
    assert refined.features[0].out_channels == 3 and refined_meta["stage"] == "model_refine"
    assert (workdir / "log/log_lenet_digits_prune_model.txt").read_text().startswith("epoch0 ")
    assert json.loads((workdir / "output/results/results_lenet_digits_prune_model.json").read_text())["params"] < 61_750


# resnet's round trip (36 s here) adds residual coupling, which the scratch backend's own tests cover: slow
@pytest.mark.parametrize("model", ["lenet", "vgg", pytest.param("resnet", marks=pytest.mark.slow)])
def test_full_round_trip_1_2_3(workdir, model, capsys):
    assert run.main(["--model", model, "--step", "123", *QUICK, "--limit_batches", "2"]) == 0
    root = workdir / "output/snapshots" / model / "digits"
    pruned, meta = load_model(root / "model_prune", model, "digits")
    assert meta["method"] == "bn" and meta["kept"]
    report = json.loads((workdir / f"output/results/results_{model}_digits_pruning.json").read_text())
    assert report["params"] < report["base"]["params"] and report["macs"] < report["base"]["macs"]
    assert {"masked_accuracy", "accuracy", "layers", "prune_seconds"} <= set(report)
    # the pruned snapshot on disk reproduces the pruned model's outputs: compare against a fresh prune of the base
    base, _ = load_model(root / "model_base", model, "digits")
    data = load_dataset("digits")
    fresh = get_backend("scratch").prune(base.eval(), "bn", 0.5, data.example_input(8)).model.eval()
    with torch.no_grad():
        assert torch.equal(pruned.eval()(data.example_input(4)), fresh(data.example_input(4)))
    assert (root / "model_refine/weights.pt").is_file()
    captured = capsys.readouterr()
    table = captured.out
    assert "1 base" in table and "2 pruned (bn 0.5)" in table and "3 refined" in table
    # the terminal tells step 1's epochs from step 3's; the log files keep the original format (checked above)
    assert (
        "step 1 base: epoch0 top_1_accuracy: " in captured.err
        and "step 3 refine: epoch0 top_1_accuracy: " in captured.err
    )
    header = [cell.strip() for cell in table.splitlines()[0].split("|")]
    rows = [line.split("|") for line in table.splitlines() if line.startswith(("| 1 base", "| 3 refined"))]
    samples = [row[header.index("samples/s")].strip() for row in rows]
    assert all(re.fullmatch(r"[\d,]+", value) for value in samples), samples  # whole samples/s, no .4f
    assert all(row[header.index("timing")].strip() in ("stable", "unstable") for row in rows)
    written = {
        line.split(" written to: ")[0]: line.split(" written to: ")[1]
        for line in table.splitlines()
        if " written to: " in line
    }
    assert set(written) == {"snapshots", "logs", "results"}
    assert all(Path(path).exists() for paths in written.values() for path in paths.split(", "))


BAD_INPUTS = [
    (["--model", "nope"], "unknown --model 'nope'"),
    (["--data_type", "nope", "--step", "1"], "unknown data type 'nope'"),
    (["--prune_method", "magic"], "unknown pruning method 'magic'"),
    (["--percent", "1.0"], r"--percent 1.0 is outside \[0, 1\)"),
    (["--percent", "-0.2"], "is outside"),
    (["--step", "15"], "--step '15' must list steps 1, 2, 3, 4"),
    (["--step", "21"], "in increasing order"),
    (["--step", "2"], "no snapshot in .*model_base"),
    (["--step", "3"], "no snapshot in .*model_prune"),
    (["--model", "dnn_2", "--prune_method", "bn"], "has no BatchNorm"),
    (["--percent", "abc"], "argument --percent: invalid float value"),
    (["--data_type", "mnist", "--step", "1"], "mnist not found: .*--download"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(workdir, capsys, argv, message):
    if argv[-1] == "abc":  # argparse's own type check exits from inside parse_args
        with pytest.raises(SystemExit) as exited:
            run.main(argv)
        assert exited.value.code == 2
    else:
        assert run.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (workdir / "output/snapshots").exists() or not any((workdir / "output/snapshots").rglob("weights.pt"))


def test_snapshot_of_another_model_is_refused(workdir, capsys):
    meta = {"model": "vgg", "data_type": "digits", "input_shape": [1, 32, 32], "num_classes": 10}
    save_snapshot(workdir / "output/snapshots/lenet/digits/model_base", build_model("vgg", (1, 32, 32), 10), meta)
    assert run.main(["--step", "2"]) == 2
    assert "is of model 'vgg', not 'lenet'" in capsys.readouterr().err


def test_cli_process_prints_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--step", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
