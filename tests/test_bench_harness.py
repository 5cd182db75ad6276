"""The comparison harness end to end on a tiny matrix: rows, tables, plots, resume, crashes, shards, merge, bad
input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
import torch

from bench import runner, store
from bench.cli import main
from bench.matrix import Cell, MatrixSpec, expand, shard
from pipeline.data.datasets import load_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    models=("lenet",),
    backends=("scratch", "nni", "tp"),
    percents=(0.5,),
    base_epochs=1,
    finetune_epochs=1,
    limit_batches=3,
    limit_val_batches=1,
)
TINY_FLAGS = [
    "--models",
    "lenet",
    "--percents",
    "0.5",
    "--base_epochs",
    "1",
    "--finetune_epochs",
    "1",
    "--limit_batches",
    "3",
    "--limit_val_batches",
    "1",
]
ROW_COLUMNS = {
    "cell",
    "model",
    "backend",
    "method",
    "percent",
    "seed",
    "scope",
    "status",
    "base_top1",
    "base_topk",
    "masked_top1",
    "masked_topk",
    "pruned_top1",
    "pruned_topk",
    "finetuned_top1",
    "finetuned_topk",
    "params_before",
    "params_after",
    "params_ratio",
    "macs_before",
    "macs_after",
    "mac_ratio",
    "size_mb_before",
    "size_mb_after",
    "size_ratio",
    "latency_b1_before_ms",
    "latency_b1_after_ms",
    "speedup_b1",
    "latency_b64_before_ms",
    "latency_b64_after_ms",
    "speedup_b64",
    "speedup_per_mac",
    "prune_seconds",
    "kept",
    "units",
    "env",
    "latency_b1_before_ms_nchw",
    "latency_b1_after_ms_nchw",
    "speedup_b1_nchw",
    "latency_b64_before_ms_nchw",
    "latency_b64_after_ms_nchw",
    "speedup_b64_nchw",
}
DETERMINISTIC = [
    "cell",
    "status",
    "base_top1",
    "masked_top1",
    "pruned_top1",
    "finetuned_top1",
    "finetuned_topk",
    "params_after",
    "macs_after",
    "kept",
]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("harness")
    rows = runner.run_matrix(MatrixSpec(**TINY), root / "out", base_root=root / "bases", data=digits)
    return root, rows


def test_tiny_matrix_records_every_figure_per_cell(tiny_run):
    root, rows = tiny_run
    cells = {row["cell"] for row in rows}
    assert cells == {
        f"lenet/{b}/{m}/0.5/seed0"
        for b, m in [
            ("scratch", "bn"),
            ("scratch", "conv_all"),
            ("scratch", "random"),
            ("nni", "l1"),
            ("nni", "fpgm"),
            ("nni", "slim"),
            ("tp", "l1"),
            ("tp", "lamp"),
            ("tp", "bn"),
        ]
    }
    for row in rows:
        assert row["status"] == "ok", row
        assert ROW_COLUMNS <= set(row), ROW_COLUMNS - set(row)
        assert row["params_after"] < row["params_before"] and row["macs_after"] < row["macs_before"]
        assert row["mac_ratio"] == pytest.approx(row["macs_before"] / row["macs_after"], rel=1e-3)
        assert row["speedup_b64"] == pytest.approx(row["latency_b64_before_ms"] / row["latency_b64_after_ms"], rel=1e-3)
        assert row["speedup_b64_nchw"] == pytest.approx(
            row["latency_b64_before_ms_nchw"] / row["latency_b64_after_ms_nchw"], rel=1e-3
        )
        assert row["env"]["memory_format"] == "channels_last (NHWC)" and row["env"]["other_memory_formats"] == {
            "nchw": "contiguous (NCHW)"
        }
        assert row["env"]["device"] == "cpu"
        assert set(row["kept"]) == set(row["units"]) and all(row["kept"][k] < row["units"][k] for k in row["kept"])
        assert {"torch", "nni", "cpu", "latency_threads"} <= set(row["env"])
    # every cell started from the same base: one trained base checkpoint for the model and seed
    assert len([p for p in (root / "bases").iterdir() if p.is_dir()]) == 1
    # the shared JobConfig path: L1 at layer scope is the same criterion on both backends
    by_method = {(row["backend"], row["method"]): row for row in rows}
    # both layer scope, floor(C/2) per layer
    assert by_method["nni", "l1"]["params_after"] == by_method["scratch", "random"]["params_after"]
    assert by_method["tp", "l1"]["params_after"] == by_method["scratch", "random"]["params_after"]
    # per-layer widths are in network order, whatever order the backend listed them in (the kept-channels plot depends
    # on it)
    saved = {row["cell"]: row for row in store.read_rows(root / "out")}
    assert list(saved["lenet/nni/l1/0.5/seed0"]["units"]) == [
        "features.0",
        "features.4",
        "classifier.0",
        "classifier.2",
    ]
    for row in saved.values():
        assert list(row["layer_rank"]) == list(row["kept"]) and list(row["layer_rank"].values()) == sorted(
            row["layer_rank"].values()
        )


def test_a_cell_computes_what_run_py_computes_from_the_same_base(tiny_run, tmp_path, monkeypatch):
    import run

    root, rows = tiny_run
    row = next(r for r in rows if r["cell"] == "lenet/scratch/conv_all/0.5/seed0")
    (base_dir,) = [p for p in (root / "bases").iterdir() if p.is_dir()]
    monkeypatch.chdir(tmp_path)
    argv = [
        "--step",
        "23",
        "--model_load_dir",
        str(base_dir),
        "--prune_method",
        "conv_all",
        "--percent",
        "0.5",
        "--num_epochs",
        "1",
        "--limit_batches",
        "3",
        "--limit_val_batches",
        "1",
    ]
    assert run.main(argv) == 0
    pruning = json.loads((tmp_path / "output/results/results_lenet_digits_pruning.json").read_text())
    refined = json.loads((tmp_path / "output/results/results_lenet_digits_prune_model.json").read_text())
    assert (pruning["masked_accuracy"], pruning["accuracy"], refined["accuracy"]) == (
        row["masked_top1"],
        row["pruned_top1"],
        row["finetuned_top1"],
    )
    assert (refined["params"], refined["macs"]) == (row["params_after"], row["macs_after"])


def test_reports_tables_and_plots(tiny_run):
    root, rows = tiny_run
    out = root / "out"
    table = pd.read_csv(out / "results.csv")
    assert len(table) == len(rows) and {"finetuned_top1", "mac_ratio", "speedup_b64", "kept_channels", "cpu"} <= set(
        table.columns
    )
    report = (out / "report.md").read_text()
    assert "## lenet" in report and "## Best fine-tuned accuracy per MAC budget" in report
    header = next(line for line in report.splitlines() if line.startswith("| backend"))
    for column in (
        "top-1 fine-tuned",
        "Δ vs base",
        "masked top-1",
        "pruned top-1",
        "params ÷",
        "MACs ÷",
        "speedup b64",
        "speedup b64 NCHW",
        "prune s",
    ):
        assert column in header
    assert (
        "Latency: cpu (" in report
        and "channels_last (NHWC) as deployed (contiguous (NCHW) in the `_nchw` columns)" in report
    )
    assert report.count("| scratch ") + report.count("| nni ") >= 6
    for name in ("accuracy_vs_macs", "speedup_vs_macs", "kept_channels", "masked_vs_pruned"):
        image = matplotlib.image.imread(out / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400, name
        assert image[..., :3].std() > 0.05, f"{name} is blank"


def test_second_run_resumes_and_does_no_work(tiny_run, digits, monkeypatch):
    root, rows = tiny_run
    before = (root / "out" / "results.jsonl").read_text()
    monkeypatch.setattr(runner, "run_cell", lambda *a, **k: pytest.fail("a finished cell was run again"))
    again = runner.run_matrix(MatrixSpec(**TINY), root / "out", base_root=root / "bases", data=digits)
    assert (root / "out" / "results.jsonl").read_text() == before and len(again) == len(rows)


def test_base_checkpoint_is_reused_across_runs(tiny_run, digits, tmp_path, monkeypatch):
    root, rows = tiny_run
    from pipeline.job import Job

    monkeypatch.setattr(Job, "step_train", lambda self: pytest.fail("the cached base model was trained again"))
    spec = MatrixSpec(**{**TINY, "backends": ("scratch",), "methods": ("conv_all",), "random_control": False})
    (row,) = runner.run_matrix(spec, tmp_path / "elsewhere", base_root=root / "bases", data=digits)
    assert row["base_top1"] == rows[0]["base_top1"]
    earlier = next(r for r in rows if r["cell"] == row["cell"])
    assert {k: row[k] for k in DETERMINISTIC} == {k: earlier[k] for k in DETERMINISTIC}


def test_ctrl_c_keeps_every_finished_cell_and_the_next_run_resumes(tmp_path, digits, monkeypatch):
    from pipeline.job import Job

    real, calls = Job.step_refine, []

    def interrupted_second(self):
        calls.append(1)
        if len(calls) == 2:  # mid-cell: the pruned snapshot of the second cell is already on disk
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Job, "step_refine", interrupted_second)
    spec = MatrixSpec(**{**TINY, "backends": ("scratch",), "methods": ("bn", "conv_all"), "random_control": False})
    with pytest.raises(KeyboardInterrupt):
        runner.run_matrix(spec, tmp_path / "out", base_root=tmp_path / "bases", data=digits)
    (saved,) = store.read_rows(tmp_path / "out")
    assert saved["status"] == "ok" and "## lenet" in (tmp_path / "out" / "report.md").read_text()
    leftovers = [p for p in (tmp_path / "out").rglob(".*")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    monkeypatch.setattr(Job, "step_refine", real)
    rows = runner.run_matrix(spec, tmp_path / "out", base_root=tmp_path / "bases", data=digits)
    assert len(rows) == 2 and all(row["status"] == "ok" for row in rows) and rows[0] == saved


def test_no_random_control_leaves_the_random_cells_out(digits):
    spec = MatrixSpec(**{**TINY, "random_control": False})
    methods = {(c.backend, c.method) for c in expand(spec, digits)}
    assert methods == {
        ("scratch", "bn"),
        ("scratch", "conv_all"),
        ("nni", "l1"),
        ("nni", "fpgm"),
        ("nni", "slim"),
        ("tp", "l1"),
        ("tp", "lamp"),
        ("tp", "bn"),
    }
    assert ("scratch", "random") in {(c.backend, c.method) for c in expand(MatrixSpec(**TINY), digits)}


def test_a_matrix_of_masked_only_cells_still_reports(tmp_path, digits):
    spec = MatrixSpec(**{**TINY, "backends": ("nni",), "methods": ("level",), "random_control": False})
    (row,) = runner.run_matrix(spec, tmp_path / "out", base_root=tmp_path / "bases", data=digits)
    assert row["status"] == "ok" and row["physical"] is False and "speedup_b64" not in row
    assert (tmp_path / "out" / "speedup_vs_macs.png").stat().st_size > 10_000


def test_fingerprint_compares_resolved_settings():
    assert (
        MatrixSpec(base_epochs=None, data_type="digits").fingerprint()
        == MatrixSpec(base_epochs=8, data_type="digits").fingerprint()
    )
    assert (
        MatrixSpec(base_epochs=None, data_type="mnist5k").fingerprint()
        != MatrixSpec(base_epochs=8, data_type="mnist5k").fingerprint()
    )
    from bench.matrix import base_key

    keys = {
        base_key(MatrixSpec(val_batch_size=v, limit_val_batches=1), "lenet", 0, (1, 32, 32), 100) for v in (64, 256)
    }
    assert len(keys) == 2, "the cached base figures depend on how many test images were evaluated"
    # the device counts by kind: shards on two GPUs of a node mix, a GPU run does not mix with a CPU one (nor shares its
    # bases)
    on = {device: MatrixSpec(device=device) for device in ("cpu", "cuda:0", "cuda:1")}
    assert on["cuda:0"].fingerprint() == on["cuda:1"].fingerprint() != on["cpu"].fingerprint()
    keys = {device: base_key(spec, "lenet", 0, (1, 32, 32), 100) for device, spec in on.items()}
    assert keys["cuda:0"] == keys["cuda:1"] != keys["cpu"]
    # CPU bases keep the keys they had before the device was recorded: caches made then are still found
    assert (
        base_key(MatrixSpec(versions={"torch": "2.14.1"}), "lenet", 0, (1, 32, 32), 100)
        == "lenet-digits-seed0-0f76a16407a7"
    )


def test_results_timed_before_the_layout_was_recorded_do_not_mix_with_new_ones(tmp_path, capsys):
    """Old run.json files lack device and latency_layout: they were CPU runs timed NCHW only, refused as such
    whatever the device."""
    out = tmp_path / "out"
    new = MatrixSpec(**TINY).fingerprint()
    old = {k: v for k, v in new.items() if k not in ("device", "latency_layout", "other_layouts")}
    store.write_manifest(out, {"fingerprint": old, "spec": {}})
    assert store.incompatibility(old, dict(old)) is None  # two old runs still merge
    assert store.incompatibility(new, {**new, "other_layouts": False}) == "other_layouts is False there but True here"
    assert main([*TINY_FLAGS, "--out", str(out), "--base_dir", str(tmp_path / "bases"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "made before latency was timed in channels_last: its latency figures are NCHW only); use another --out" in err
    )
    assert len(err.splitlines()) == 1


def test_deployed_layout_only_leaves_the_nchw_columns_out(tmp_path, capsys):
    out = tmp_path / "out"
    flags = [
        *TINY_FLAGS,
        "--backends",
        "scratch",
        "--methods",
        "conv_all",
        "--no_random_control",
        "--deployed_layout_only",
    ]
    assert main([*flags, "--out", str(out), "--base_dir", str(tmp_path / "bases")]) == 0
    (row,) = store.read_rows(out)
    assert (
        row["speedup_b64"] > 0
        and not any(key.endswith("_nchw") for key in row)
        and row["env"]["other_memory_formats"] == {}
    )
    report = (out / "report.md").read_text()
    assert "speedup b64 NCHW" not in report and "channels_last (NHWC) as deployed, float32" in report


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine: the GPU path is checked where one is"
)
def test_a_matrix_runs_on_cuda_and_times_there(tmp_path, digits, monkeypatch):
    import pipeline.deploy.latency

    timed_on: list[str] = []
    measure = pipeline.deploy.latency.measure_models
    monkeypatch.setattr(
        pipeline.deploy.latency,
        "measure_models",
        lambda models, **options: timed_on.append(options["example_input"].device.type) or measure(models, **options),
    )
    spec = MatrixSpec(
        **{**TINY, "backends": ("scratch",), "methods": ("conv_all",), "random_control": False, "device": "cuda:0"}
    )
    (row,) = runner.run_matrix(spec, tmp_path / "out", base_root=tmp_path / "bases", data=digits)
    assert (
        row["status"] == "ok" and row["env"]["device_name"] == torch.cuda.get_device_name(0) and row["speedup_b64"] > 0
    )
    assert timed_on and set(timed_on) == {"cuda"}


def test_report_command_rerenders_from_saved_rows(tiny_run, capsys):
    root, _ = tiny_run
    (root / "out" / "report.md").unlink()
    (root / "out" / "speedup_vs_macs.png").unlink()
    assert main(["report", str(root / "out")]) == 0
    assert (root / "out" / "report.md").read_text().startswith("# prunebench comparison")
    assert (root / "out" / "speedup_vs_macs.png").stat().st_size > 10_000


def test_a_crashing_cell_is_recorded_and_the_matrix_goes_on(tmp_path, digits, monkeypatch):
    real = runner.run_cell

    def flaky(spec, cell, *args, **kwargs):
        if cell.method == "conv_all":
            raise RuntimeError("simulated failure\nwith a second line")
        return real(spec, cell, *args, **kwargs)

    monkeypatch.setattr(runner, "run_cell", flaky)
    spec = MatrixSpec(**{**TINY, "backends": ("scratch",)})
    rows = {
        row["cell"]: row for row in runner.run_matrix(spec, tmp_path / "out", base_root=tmp_path / "bases", data=digits)
    }
    failed = rows["lenet/scratch/conv_all/0.5/seed0"]
    assert failed["status"] == "error" and failed["error"] == "RuntimeError: simulated failure"
    assert (
        rows["lenet/scratch/bn/0.5/seed0"]["status"] == "ok"
        and rows["lenet/scratch/random/0.5/seed0"]["status"] == "ok"
    )
    assert "## Failed cells" in (tmp_path / "out" / "report.md").read_text()
    # the failed cell is retried by the next run; the finished ones are not
    monkeypatch.setattr(runner, "run_cell", real)
    rerun = {
        row["cell"]: row for row in runner.run_matrix(spec, tmp_path / "out", base_root=tmp_path / "bases", data=digits)
    }
    assert rerun["lenet/scratch/conv_all/0.5/seed0"]["status"] == "ok"
    assert rerun["lenet/scratch/bn/0.5/seed0"] == rows["lenet/scratch/bn/0.5/seed0"]


def test_shards_merged_give_the_unsharded_rows(tmp_path, digits, capsys):
    spec = MatrixSpec(**{**TINY, "methods": ("conv_all", "l1")})
    cells = expand(spec, digits)
    assert len(cells) == 4 and sorted(shard(cells, 0, 2) + shard(cells, 1, 2)) == cells  # l1 on nni and tp
    whole = runner.run_matrix(spec, tmp_path / "whole", base_root=tmp_path / "bases", data=digits)
    for index in range(2):  # separate processes would do this; each shard with its own base cache
        flags = [
            *TINY_FLAGS,
            "--methods",
            "conv_all,l1",
            "--shard",
            f"{index}/2",
            "--out",
            str(tmp_path / f"shard{index}"),
            "--base_dir",
            str(tmp_path / f"bases{index}"),
        ]
        assert main(flags) == 0
    assert len(store.read_rows(tmp_path / "shard0")) == 2 and len(store.read_rows(tmp_path / "shard1")) == 2
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "shard0"), str(tmp_path / "shard1"), "--out", str(tmp_path / "merged")]) == 0
    assert "warning" not in capsys.readouterr().err
    merged = store.read_rows(tmp_path / "merged")

    def deterministic(rows):
        return sorted(json.dumps({k: r[k] for k in DETERMINISTIC}, sort_keys=True) for r in rows)

    assert deterministic(merged) == deterministic(whole)
    assert (tmp_path / "merged" / "report.md").is_file() and (tmp_path / "merged" / "accuracy_vs_macs.png").is_file()
    # a missing shard is named; an ok row wins over a failed attempt of the same cell
    assert main(["merge", str(tmp_path / "shard0"), "--out", str(tmp_path / "half")]) == 0
    assert "no directory holds shard(s) 1/2" in capsys.readouterr().err
    failed = {**store.read_rows(tmp_path / "shard1")[0], "status": "error", "error": "RuntimeError: x"}
    store.write_manifest(tmp_path / "retry", store.read_manifest(tmp_path / "shard1"))
    store.write_rows(tmp_path / "retry", [failed])
    assert (
        main(
            [
                "merge",
                str(tmp_path / "retry"),
                str(tmp_path / "shard0"),
                str(tmp_path / "shard1"),
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )
    assert deterministic(store.read_rows(tmp_path / "again")) == deterministic(whole)


def test_merge_refuses_incompatible_runs(tmp_path, digits, capsys):
    for name, epochs in (("a", 1), ("b", 0)):
        runner.run_matrix(
            MatrixSpec(
                **{
                    **TINY,
                    "backends": ("scratch",),
                    "methods": ("conv_all",),
                    "random_control": False,
                    "finetune_epochs": epochs,
                }
            ),
            tmp_path / name,
            base_root=tmp_path / "bases",
            data=digits,
        )
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "incompatible runs (finetune_epochs is 0 there but 1 here)" in err
    assert not (tmp_path / "m").exists()


def test_scratch_control_trains_the_pruned_architecture_from_scratch(tmp_path, digits):
    spec = MatrixSpec(
        **{**TINY, "backends": ("scratch",), "methods": ("conv_all",), "random_control": False, "scratch_control": True}
    )
    (row,) = runner.run_matrix(spec, tmp_path / "out", base_root=tmp_path / "bases", data=digits)
    assert 0.0 <= row["scratch_top1"] <= 1.0 and "from scratch top-1" in (tmp_path / "out" / "report.md").read_text()


def test_impossible_combination_is_refused_before_training(tmp_path, digits):
    from pipeline.errors import UsageError

    with pytest.raises(
        UsageError,
        match=r"scratch:bn cannot prune dnn_2: .*no BatchNorm.*scratch offers bn, conv_avg.*nni offers level, l1",
    ):
        runner.run_matrix(
            MatrixSpec(**{**TINY, "models": ("dnn_2",), "methods": ("scratch:bn",)}),
            tmp_path / "out",
            base_root=tmp_path / "b",
            data=digits,
        )
    assert not (tmp_path / "out").exists() and not (tmp_path / "b").exists()


def test_cell_keys_tell_close_percents_apart():
    assert Cell("vgg", 1, "nni", "l1", 0.3).key == "vgg/nni/l1/0.3/seed1"
    assert Cell("vgg", 1, "nni", "l1", 0.3).key != Cell("vgg", 1, "nni", "l1", 0.3000001).key


BAD = [
    (["--models", "nope", "--data_type", "cifar10"], r"unknown model 'nope'"),  # named before any dataset is looked for
    (["--models", "nope"], r"unknown model 'nope' in --models; choose from: dnn_2"),
    (["--backends", "tf"], r"unknown backend 'tf' in --backends"),
    (["--methods", "magic"], r"no backend in --backends offers method 'magic'; scratch offers"),
    (["--methods", "nni:bn"], r"backend nni has no method 'bn'"),
    (["--models", ""], r"the matrix is empty"),
    (["--shard", "3/2"], r"--shard 3/2: the index must be in 0..1"),
    (["--shard", "x"], r"--shard 'x' must be i/n"),
    (["--percents", "1.0"], r"percent 1 in --percents is outside \[0, 1\)"),
    (["--percents", "a,b"], r"--percents takes comma-separated float values"),
    (["--latency_tolerance", "0"], r"--latency_tolerance must be a fraction in \(0, 1\)"),
    (["--latency_cap", "nan"], r"--latency_cap must be a positive number, got nan"),
    *(
        [(["--device", "cuda"], r"--device cuda: this machine has no usable CUDA device")]
        if not torch.cuda.is_available()
        else []
    ),
    (["--device", "tpu"], r"--device .tpu. is not a device; use auto, cpu, cuda or cuda:N"),
]


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    flags = [*TINY_FLAGS, "--out", str(out), "--base_dir", str(tmp_path / "bases"), *argv]
    if argv[0] == "--percents" and argv[1] == "a,b":
        with pytest.raises(SystemExit) as exited:
            main(flags)
        assert exited.value.code == 2
    else:
        assert main(flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists() and not (tmp_path / "bases").exists()


def test_results_directory_of_an_incompatible_run_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    store.write_manifest(out, {"fingerprint": {"data_type": "mnist5k"}, "spec": {}})
    assert main([*TINY_FLAGS, "--out", str(out), "--base_dir", str(tmp_path / "bases")]) == 2
    err = capsys.readouterr().err
    assert "holds results of an incompatible run" in err and "use another --out" in err
    assert not (out / "results.jsonl").exists()


@pytest.mark.parametrize("command", ["run", "merge"])
def test_out_that_is_a_file_is_refused(tiny_run, tmp_path, capsys, command):
    root, _ = tiny_run
    (tmp_path / "taken").write_text("x")
    if command == "run":
        argv, message = [*TINY_FLAGS, "--out", str(tmp_path / "taken")], "is a file; give a directory"
    else:
        argv, message = (
            ["merge", str(root / "out"), "--out", str(tmp_path / "taken")],
            "exists and is not an empty directory",
        )
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert (tmp_path / "taken").read_text() == "x"


def test_a_run_with_failed_cells_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "run_cell", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    argv = [
        *TINY_FLAGS,
        "--backends",
        "scratch",
        "--methods",
        "conv_all",
        "--out",
        str(tmp_path / "o"),
        "--base_dir",
        str(tmp_path / "b"),
    ]
    assert main(argv) == 1
    assert (
        "2 cell(s) failed" in capsys.readouterr().err
        and "RuntimeError: boom" in (tmp_path / "o" / "report.md").read_text()
    )


def test_cli_process_prints_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--shard", "5/2", "--out", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_distillation_and_int8_are_axes_of_the_matrix(tmp_path, digits):
    spec = MatrixSpec(
        **{
            **TINY,
            "backends": ("scratch",),
            "methods": ("conv_all",),
            "random_control": False,
            "distill": (False, True),
            "quantize": ("none", "ptq"),
        }
    )
    rows = runner.run_matrix(spec, tmp_path / "out", base_root=tmp_path / "bases", data=digits)
    assert {row["cell"] for row in rows} == {
        f"lenet/scratch/conv_all/0.5/seed0{suffix}" for suffix in ("", "/kd", "/int8-ptq", "/kd/int8-ptq")
    }
    by_key = {(row["distill"], row["quantize"]): row for row in rows}
    assert all(row["status"] == "ok" for row in rows)
    assert "int8_top1" not in by_key[False, "none"] and by_key[True, "ptq"]["size_ratio_int8"] > 3.5
    # its speedup is against the dense base re-timed on the CPU, recorded beside it, per layout
    int8 = by_key[True, "ptq"]
    for suffix in ("", "_nchw"):
        expected = int8[f"latency_b64_int8_reference_ms{suffix}"] / int8[f"latency_b64_int8_ms{suffix}"]
        assert int8[f"speedup_int8_b64{suffix}"] == pytest.approx(expected, rel=1e-3)
    # int8 is added after the same refine
    assert by_key[False, "ptq"]["finetuned_top1"] == by_key[False, "none"]["finetuned_top1"]
    assert by_key[True, "none"]["finetuned_top1"] == by_key[True, "ptq"]["finetuned_top1"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| KD " in report and "int8 top-1" in report


def test_an_nni_quantizer_cell_reports_simulated_int8_accuracy_only(tmp_path, digits):
    pytest.importorskip("nni")
    spec = MatrixSpec(
        **{
            **TINY,
            "backends": ("scratch",),
            "methods": ("conv_all",),
            "random_control": False,
            "quantize": ("nni-ptq",),
        }
    )
    (row,) = runner.run_matrix(spec, tmp_path / "out", base_root=tmp_path / "bases", data=digits)
    assert row["status"] == "ok" and row["cell"].endswith("/int8-nni-ptq") and 0 <= row["int8_top1"] <= 1
    assert not any(key in row for key in ("size_mb_int8", "size_ratio_int8", "latency_b64_int8_ms", "speedup_int8_b64"))
    report = (tmp_path / "out" / "report.md").read_text()
    line = next(line for line in report.splitlines() if "| nni-ptq" in line)
    assert line.count("| -") >= 2  # int8 size and speedup: not measured for simulated int8
    assert "NNI's simulated int8 (fake quantization in float): accuracy only" in report


def test_bad_compression_axes_are_refused(capsys):
    assert main([*TINY_FLAGS, "--quantize", "int4"]) == 2
    assert "--quantize takes none, ptq, qat" in capsys.readouterr().err
    assert main([*TINY_FLAGS, "--distill", "maybe"]) == 2
    assert "--distill takes off, on or off,on" in capsys.readouterr().err
