"""Lose nothing, mix nothing: the converter, snapshot lineage, stale datasets, concurrent harness runs, corrupt files,
interrupted steps, requests that do nothing, and analyze.py on int8 snapshots (one test per defect of issue 23)."""

import fcntl
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import analyze
import ofrecordMake
import run
from bench import runner, store
from bench.matrix import MatrixSpec
from pipeline import job
from pipeline.data import ofrecord_convert
from pipeline.data.datasets import load_dataset
from pipeline.errors import UsageError
from pipeline.snapshots import load_snapshot, save_snapshot
from tests.helpers import quick_run

ROOT = Path(__file__).resolve().parents[1]
QUICK = quick_run(limit_batches=2)
SNAPSHOTS = Path("output/snapshots/lenet/digits")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    for fragment in fragments:
        assert fragment in err, err
    assert "Traceback" not in err and "weights_only" not in err
    return err


def json_dataset(folder: Path, classes: int, rows: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", rows), ("test", classes)):
        payload = {
            "data": rng.integers(0, 256, (count, 16 * 16)).tolist(),
            "label": [i % classes for i in range(count)],
        }
        (folder / f"{split}.json").write_text(
            json.dumps({**payload, "shape": [1, 16, 16]} if split == "train" else payload)
        )
    return folder


# 1. the converter never writes where it reads, and never deletes what it did not create


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataName", "ds", "--myData_dir", "D", "--ofData_dir", "D"], "holds the source folder"),
        (["--dataName", "ds", "--myData_dir", "D", "--ofData_dir", "D/ds"], "is the source folder"),
        (["--dataName", "ds", "--myData_dir", "D", "--ofData_dir", "D/ds/out"], "lies inside the source folder"),
        (["--dataName", "../D/ds", "--myData_dir", "D", "--ofData_dir", "out"], "is not a plain folder name"),
        (["--dataName", "ds", "--myData_dir", "D", "--ofData_dir", "afile"], "is a file"),
        (["--dataName", "ds", "--myData_dir", "D", "--ofData_dir", "foreign"], "is not a dataset this converter wrote"),
    ],
)
def test_converter_refuses_to_write_where_it_reads_and_keeps_its_input(workdir, capsys, argv, message):
    json_dataset(workdir / "D/ds", classes=3)
    (workdir / "afile").write_text("not a folder")
    (workdir / "foreign/ds").mkdir(parents=True)
    (workdir / "foreign/ds/notes.txt").write_text("the user's own file")
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    assert ofrecordMake.main(argv) == 2
    one_line_error(capsys, message)
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before
    assert (workdir / "foreign/ds/notes.txt").read_text() == "the user's own file"


def test_converter_interrupted_is_one_line_exit_130_and_leaves_the_earlier_conversion(workdir, capsys, monkeypatch):
    json_dataset(workdir / "myData/ds", classes=3)
    assert ofrecordMake.main(["--dataName", "ds"]) == 0
    first = (workdir / "ofData/ds/meta.json").read_text()
    assert json.loads(first)["source"].keys() == {"train.json", "test.json"}  # the hash of what it came from

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ofrecord_convert, "_write_split", interrupted)
    capsys.readouterr()
    assert ofrecordMake.main(["--dataName", "ds"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted") and len(err.splitlines()) == 1
    assert (workdir / "ofData/ds/meta.json").read_text() == first and sorted(
        p.name for p in (workdir / "ofData").iterdir()
    ) == ["ds"]


# 2. snapshots carry their lineage; nothing is built on a stale parent, and the settings written are this run's


def test_lineage_refuses_stale_parents_and_records_this_runs_settings(workdir, capsys):
    assert run.main(["--step", "123", *QUICK]) == 0
    out = capsys.readouterr().out
    assert "lineage: model_base" in out and "-> model_prune" in out and "-> model_refine" in out

    assert run.main(["--step", "13", "--seed", "7", *QUICK]) == 2  # would refine the old seed-0 prune
    one_line_error(capsys, "would refine an older pruned model", "add 2")

    assert run.main(["--step", "3", "--seed", "3", *QUICK]) == 0
    _, meta = load_snapshot(SNAPSHOTS / "model_refine")
    assert meta["seed"] == 3 and meta["settings"]["seed"] == 3
    assert [entry["stage"] for entry in meta["lineage"]] == ["model_base", "model_prune"] and meta["lineage"][1][
        "settings"
    ]["seed"] == 0
    results = json.loads(Path("output/results/results_lenet_digits_prune_model.json").read_text())
    assert results["seed"] == 3 and [entry["stage"] for entry in results["lineage"]] == [
        "model_base",
        "model_prune",
        "model_refine",
    ]
    capsys.readouterr()

    assert run.main(["--step", "3", "--percent", "0.3", *QUICK]) == 2  # asks for a prune other than the one on disk
    one_line_error(capsys, "asks for percent 0.3", "made with 0.5")
    assert run.main(["--step", "3", "--prune_scope", "auto", "--percent", "0.5", *QUICK]) == 0  # asks for what is there
    capsys.readouterr()

    assert run.main(["--step", "2", "--percent", "0.2", *QUICK]) == 0
    capsys.readouterr()
    assert run.main(["--step", "4", *QUICK]) == 2  # the refine on disk was made from the 0.5 prune
    one_line_error(capsys, "model_refine was made from an earlier model_prune", "run --step 3 again")

    assert run.main(["--step", "1", "--seed", "1", *QUICK]) == 0
    assert "were made from the previous base" in capsys.readouterr().err
    assert run.main(["--step", "3", *QUICK]) == 2  # the prune on disk was made from the seed-0 base
    one_line_error(capsys, "model_prune was made from an earlier model_base", "run --step 2 again")


def test_lineage_follows_a_base_loaded_from_elsewhere(workdir, capsys):
    assert run.main(["--step", "1", "--model_save_dir", "A", *QUICK]) == 0
    assert run.main(["--step", "1", "--seed", "1", *QUICK]) == 0  # another base in the default folder
    assert run.main(["--step", "2", "--model_load_dir", "A", *QUICK]) == 0  # prunes A's base, saves beside the other
    assert run.main(["--step", "3", *QUICK]) == 0  # the prune's parent is A's base, unchanged: not stale
    assert run.main(["--step", "1", "--seed", "2", "--model_save_dir", "A", *QUICK]) == 0  # now A's base is replaced
    capsys.readouterr()
    assert run.main(["--step", "3", *QUICK]) == 2
    one_line_error(capsys, "model_prune was made from an earlier model_base", f"{workdir / 'A' / 'model_base'}")


# 3. datasets know their source


def test_changed_custom_data_is_reconverted_and_its_old_base_refused(workdir, capsys):
    json_dataset(workdir / "myData/custom", classes=3)
    assert run.main(["--data_type", "custom", "--step", "1", *QUICK]) == 0
    json_dataset(workdir / "myData/custom", classes=5, seed=1)  # the user edits the JSON: 5 classes now
    capsys.readouterr()
    assert run.main(["--data_type", "custom", "--step", "2", *QUICK]) == 2
    err = capsys.readouterr().err
    assert "converting myData/custom to ofData/custom (OFRecord) again: myData/custom changed" in err
    assert "was trained on another version of dataset 'custom'" in err and err.count("error:") == 1
    assert json.loads((workdir / "ofData/custom/meta.json").read_text())["num_classes"] == 5


def test_harness_base_cache_and_results_tell_datasets_of_one_name_apart(workdir, capsys):
    for folder, classes in (("one", 3), ("two", 4)):
        json_dataset(workdir / folder / "myData/same", classes=classes, seed=classes)
        ofrecord_convert.convert_json_dataset("same", workdir / folder / "myData", workdir / folder / "ofData")
    one, two = (load_dataset("same", dataset_dir=workdir / folder / "ofData/same") for folder in ("one", "two"))
    assert one.identity and two.identity and one.identity != two.identity
    spec = MatrixSpec(
        models=("lenet",),
        backends=("scratch",),
        methods=("conv_all",),
        percents=(0.5,),
        data_type="same",
        base_epochs=0,
        finetune_epochs=0,
        random_control=False,
        other_layouts=False,
    )
    for data, out in ((one, "res1"), (two, "res2")):
        (row,) = runner.run_matrix(spec, workdir / out, base_root=workdir / "bases", data=data)
        assert row["status"] == "ok", row["error"]
    assert len([p for p in (workdir / "bases").iterdir() if p.is_dir()]) == 2  # one base per dataset, not one per name
    with pytest.raises(UsageError, match="dataset is"):  # the other dataset's results do not join this table
        runner.run_matrix(spec, workdir / "res1", base_root=workdir / "bases", data=two)


# 4. one writer per results directory; no row lost


def _record_many(directory: str, writer: int, count: int) -> None:
    for index in range(count):
        store.record(Path(directory), {"cell": f"w{writer}/{index}", "status": "ok", "payload": "x" * 500})


def test_record_from_two_processes_keeps_every_row(tmp_path):
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_record_many, args=(str(tmp_path), w, 200)) for w in range(2)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(120)
        assert process.exitcode == 0
    rows = store.read_rows(tmp_path)
    assert len(rows) == 400 and {row["cell"] for row in rows} == {f"w{w}/{i}" for w in range(2) for i in range(200)}


def test_a_line_cut_short_by_a_crash_is_dropped_not_read(tmp_path):
    store.record(tmp_path, {"cell": "a", "status": "ok"})
    with (tmp_path / store.RESULTS).open("a") as handle:
        handle.write('{"cell": "b", "sta')  # a kill -9 in the middle of a write
    assert [row["cell"] for row in store.read_rows(tmp_path)] == ["a"]
    store.record(tmp_path, {"cell": "a", "status": "error"})
    store.record(tmp_path, {"cell": "c", "status": "ok"})
    assert [(row["cell"], row["status"]) for row in store.read_rows(tmp_path)] == [("a", "error"), ("c", "ok")]


def test_second_harness_run_on_one_out_is_refused_naming_the_first(workdir):
    command = [
        sys.executable,
        "-m",
        "bench",
        "--models",
        "lenet",
        "--backends",
        "scratch",
        "--methods",
        "conv_all",
        "--percents",
        "0.5",
        "--no_random_control",
        "--base_epochs",
        "500",
        "--out",
        "res",
        "--base_dir",
        "bases",
    ]
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        command, cwd=workdir, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        lock = workdir / "res" / store.LOCK
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        second = subprocess.run(command, cwd=workdir, env=environment, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second was refused"
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert (
            second.stderr.strip().count("\n") == 0
            and f"in use by another python -m bench run (pid {first.pid})" in second.stderr
        )
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(120)
    assert first.returncode == 130
    with store.exclusive(workdir / "res"):  # released by the interrupted run
        pass


# 5. corrupt files are one line everywhere


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "weights.pt").write_bytes(os.urandom(4096)), "weights.pt is unreadable"),
        (lambda d: (d / "weights.pt").write_text("hello"), "weights.pt is unreadable"),
        (
            lambda d: (d / "weights.pt").write_bytes(
                bytes(b ^ 0xFF for b in (d / "weights.pt").read_bytes()[:64]) + (d / "weights.pt").read_bytes()[64:]
            ),
            "weights.pt is unreadable",
        ),
        (lambda d: (d / "meta.json").write_text("[]"), "holds a JSON list, not an object"),
        (
            lambda d: (d / "meta.json").write_text(
                json.dumps({k: v for k, v in json.loads((d / "meta.json").read_text()).items() if k != "input_shape"})
            ),
            "has no valid 'input_shape'",
        ),
    ],
)
def test_corrupt_snapshot_is_one_line_in_run_and_analyze(workdir, capsys, damage, message):
    assert run.main(["--step", "12", *QUICK]) == 0
    damage(SNAPSHOTS / "model_base")
    capsys.readouterr()
    assert run.main(["--step", "2", *QUICK]) == 2
    one_line_error(capsys, message)
    for argv in (
        ["stats", "--snapshot", str(SNAPSHOTS / "model_base")],
        ["stats", "--snapshot", str(SNAPSHOTS / "model_prune"), "--compare", str(SNAPSHOTS / "model_base")],
        ["export", "--format", "onnx", "--snapshot", str(SNAPSHOTS / "model_base"), "--out", "x.onnx"],
    ):
        assert analyze.main(argv) == 2
        one_line_error(capsys, message)
    assert not Path("x.onnx").exists()


def test_corrupt_run_json_is_one_line(workdir, capsys):
    (workdir / "res").mkdir()
    (workdir / "res" / store.MANIFEST).write_text("[1, 2]")
    from bench.cli import main as bench_main

    assert bench_main(["report", "res"]) == 2
    one_line_error(capsys, "run.json is not the JSON object python -m bench writes")
    assert bench_main(["--models", "lenet", "--percents", "0.5", "--out", "res"]) == 2
    one_line_error(capsys, "run.json is not the JSON object")


# 6. an interrupted step leaves the previous files intact; a killed save's staging is cleaned up, never read


def test_interrupted_step_keeps_the_previous_log(workdir, capsys, monkeypatch):
    assert run.main(["--step", "1", *QUICK]) == 0
    log = workdir / "log/log_lenet_digits_base_model.txt"
    before = log.read_text()
    assert before.startswith("epoch0 ")
    real_train = job.train

    def interrupted_after_an_epoch(*args, **kwargs):
        kwargs["epochs"] = 1
        real_train(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "train", interrupted_after_an_epoch)
    assert run.main(["--step", "1", "--seed", "5", *QUICK]) == 130
    assert log.read_text() == before and sorted(p.name for p in log.parent.iterdir()) == [log.name]


def test_staging_left_by_a_killed_save_is_removed_and_a_live_one_kept(workdir):
    root = workdir / SNAPSHOTS
    abandoned = root / ".model_base.staging-999999-x1y2"  # its writer was killed: nobody holds it
    abandoned.mkdir(parents=True)
    (abandoned / "weights.pt").write_bytes(b"half a file")
    running = root / ".model_base.staging-1-busy"  # another writer, alive, holds its staging folder
    running.mkdir()
    held = os.open(running, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        assert run.main(["--step", "1", *QUICK]) == 0
        assert not abandoned.exists() and running.exists()
    finally:
        os.close(held)
    assert load_snapshot(root / "model_base")[1]["stage"] == "model_base"
    assert sorted(p.name for p in root.iterdir()) == [".model_base.staging-1-busy", "model_base"]


def test_a_swap_killed_between_its_renames_is_undone_by_the_next_reader(tmp_path):
    from models import build_model

    meta = {"model": "lenet", "data_type": "digits", "input_shape": [1, 32, 32], "num_classes": 10}
    save_snapshot(tmp_path / "model_base", build_model("lenet", (1, 32, 32), 10), meta)
    (tmp_path / "model_base").rename(tmp_path / ".model_base.retired-4242-x")  # killed before the second rename
    assert load_snapshot(tmp_path / "model_base")[1]["model"] == "lenet"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_base"]


# 7. requests that do nothing are refused or said


@pytest.mark.parametrize("threshold", ["nan", "-1"])
def test_threshold_that_is_not_a_magnitude_is_refused_up_front(workdir, capsys, threshold):
    assert run.main(["--step", "12", "--prune_method", "conv_threshold", "--threshold", threshold, *QUICK]) == 2
    one_line_error(capsys, "--threshold must be a non-negative number")
    assert not (workdir / "log").exists()


def test_threshold_that_ties_every_score_is_refused_and_a_deciding_one_recorded(workdir, capsys):
    assert run.main(["--step", "1", *QUICK]) == 0
    for threshold in ("0", "100"):
        capsys.readouterr()
        assert run.main(["--step", "2", "--prune_method", "conv_threshold", "--threshold", threshold, *QUICK]) == 2
        one_line_error(
            capsys,
            f"threshold {threshold} gives every filter of every layer the same count",
            "choose a threshold inside",
        )
    assert run.main(["--step", "2", "--prune_method", "conv_threshold", "--threshold", "0.05", *QUICK]) == 0
    assert "2 pruned (conv_threshold 0.5, threshold 0.05)" in capsys.readouterr().out
    assert load_snapshot(SNAPSHOTS / "model_prune")[1]["settings"]["threshold"] == 0.05


def test_sensitivity_scans_conv_threshold_whatever_ties_a_layer_has(workdir, capsys):
    assert run.main(["--step", "1", *QUICK]) == 0
    argv = [
        "sensitivity",
        "--model",
        "lenet",
        "--prune_method",
        "conv_threshold",
        "--threshold",
        "100",
        "--sparsities",
        "0.5",
        "--limit_val_batches",
        "1",
        "--specified_layers",
        "features.0",
    ]
    assert analyze.main(argv) == 0
    assert "features.0" in capsys.readouterr().out


def test_a_prune_that_removes_nothing_says_so(workdir, capsys):
    assert run.main(["--step", "12", "--round_to", "1000", *QUICK]) == 0
    captured = capsys.readouterr()
    assert "2 pruned (bn 0.5: removed nothing)" in captured.out
    assert "note: the prune removed no channel (with --round_to 1000)" in captured.err
    assert json.loads(Path("output/results/results_lenet_digits_pruning.json").read_text())["removed_nothing"] is True


def test_learning_rate_nan_is_refused_up_front_in_run_and_the_harness(workdir, capsys):
    assert run.main(["--learning_rate", "nan"]) == 2
    one_line_error(capsys, "--learning_rate must be a positive number, got nan")
    from bench.cli import main as bench_main

    assert bench_main(["--learning_rate", "nan", "--out", "res"]) == 2
    one_line_error(capsys, "--learning_rate must be a positive number, got nan")
    assert not (workdir / "res").exists() and not (workdir / "log").exists()


# 8. analyze.py and int8 snapshots


def test_analyze_refuses_int8_snapshots_where_it_cannot_read_them(workdir, capsys):
    assert run.main(["--step", "1234", *QUICK]) == 0
    quantized = str(SNAPSHOTS / "model_quant")
    capsys.readouterr()
    for argv in (
        ["stats", "--snapshot", quantized],
        ["dependency", "--snapshot", quantized],
        ["sensitivity", "--snapshot", quantized],
        ["export", "--format", "onnx", "--snapshot", quantized, "--out", "q.onnx"],
    ):
        assert analyze.main(argv) == 2
        one_line_error(capsys, "holds an int8 model", "export --format torchscript or --format masks")
    assert analyze.main(["export", "--format", "torchscript", "--snapshot", quantized, "--out", "q.pt"]) == 0
    assert torch.jit.load("q.pt") is not None
