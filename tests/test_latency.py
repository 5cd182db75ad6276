"""Latency a user can trust on a busy machine: the stability protocol on a fake clock, one measurement per architecture,
measurements kept for resume and merge, and the `unstable` mark in every place a figure is shown (issue 25)."""

import json
import os
import random

import pandas as pd
import pytest
import torch
from torch import nn

import run
from bench import runner, store
from bench.cli import main as bench_main
from bench.matrix import MatrixSpec
from pipeline.data.datasets import load_dataset
from pipeline.deploy.latency import (
    Measurements,
    Protocol,
    architecture_signature,
    latency_by_layout,
    measure,
    measure_models,
)
from pipeline.deploy.metrics import deployable
from pipeline.job import Job
from tests.helpers import quick_run, zoo


class Clock:
    """A fake timer: models advance it by their cost, times an injected noise factor."""

    def __init__(self, noise: float, seed: int = 0) -> None:
        self.now, self.noise, self.random = 0.0, noise, random.Random(seed)

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds * (1 + self.random.uniform(-self.noise, self.noise))


class Costly(nn.Module):
    """A "model" that takes `cost` fake seconds per forward."""

    def __init__(self, clock: Clock, cost: float) -> None:
        super().__init__()
        self.clock, self.cost = clock, cost

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.spend(self.cost)
        return x


X = torch.zeros(1, 3, 4, 4)


def timed(noise: float, protocol: Protocol, costs: tuple[float, ...] = (0.010, 0.005)):
    clock = Clock(noise)
    models = [Costly(clock, cost) for cost in costs]
    return measure_models(models, example_input=X, batch=2, protocol=protocol, timer=clock)


def test_a_quiet_clock_settles_in_the_fewest_blocks_and_the_speedup_is_paired():
    measured = timed(noise=0.001, protocol=Protocol(min_blocks=4, pin=False))
    assert measured.blocks == 5 and all(t.stable for t in measured.timings)  # within at two looks in a row: 4 and 5
    (speedup,) = measured.speedups
    assert speedup.stable and speedup.low <= 2.0 <= speedup.high and abs(speedup.value - 2.0) < 0.01
    assert measured.timings[0].runs == 5 * Protocol().runs_per_block


def test_noise_makes_the_protocol_add_blocks_until_the_interval_is_tight():
    quiet = timed(noise=0.001, protocol=Protocol(pin=False))
    noisy = timed(noise=0.30, protocol=Protocol(pin=False, cap_s=1e9))
    assert noisy.blocks > quiet.blocks and noisy.speedups[0].stable
    assert noisy.speedups[0].high / noisy.speedups[0].value <= 1 + Protocol().tolerance + 1e-9


def test_past_its_cap_a_noisy_figure_is_marked_unstable():
    measured = timed(noise=0.9, protocol=Protocol(pin=False, cap_s=0.5, tolerance=0.001))
    assert not measured.speedups[0].stable and not any(t.stable for t in measured.timings)
    assert measured.seconds >= 0.5 and measured.blocks >= 2  # it went on until the cap, then gave up


def test_one_slow_run_does_not_end_the_warm_up():
    clock = Clock(noise=0.0)
    costs = iter([0.064, 0.032, 0.016, 0.100, 0.008, 0.004, 0.002])  # a spike of load in the middle of the warm-up

    class Scripted(Costly):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.cost = next(costs, 0.001)
            return super().forward(x)

    measured = measure_models(
        [Scripted(clock, 0.0)], example_input=X, batch=1, protocol=Protocol(pin=False), timer=clock
    )
    assert measured.timings[0].median == pytest.approx(0.001) and measured.timings[0].stable


def test_identical_models_time_alike_whichever_goes_first():
    """No model may gain from its place in the block: on a clock where each pause for bookkeeping (the timer read three
    times with no run between) leaves the caches cold, and runs grow faster as they warm again, two identical models
    must still come out equal (run in a fixed order, the second gains about 2% in every block)."""

    class ColdAfterPauses(Clock):
        def __init__(self) -> None:
            super().__init__(noise=0.0)
            self.reads, self.warmth = 0, 0

        def __call__(self) -> float:
            self.reads += 1
            return self.now

        def spend(self, seconds: float) -> None:
            self.warmth = 0 if self.reads >= 3 else self.warmth + 1
            self.reads = 0
            super().spend(seconds * (1 + 0.5 * 0.5**self.warmth))

    clock = ColdAfterPauses()
    twins = [Costly(clock, 0.010), Costly(clock, 0.010)]
    measured = measure_models(twins, example_input=X, batch=1, protocol=Protocol(pin=False, cap_s=1e9), timer=clock)
    (speedup,) = measured.speedups
    assert speedup.stable and abs(speedup.value - 1.0) < 0.005, speedup


def test_warm_up_runs_until_times_stop_falling():
    clock = Clock(noise=0.0)

    class Warming(Costly):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.cost = max(0.001, self.cost * 0.5)  # each run faster, until it settles at 1 ms
            return super().forward(x)

    model = Warming(clock, 0.064)
    measured = measure_models([model], example_input=X, batch=1, protocol=Protocol(pin=False), timer=clock)
    assert measured.timings[0].median == pytest.approx(0.001) and measured.timings[0].stable


def test_the_timing_thread_is_pinned_where_the_os_allows():
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    measured = measure_models([nn.Identity()], example_input=X, batch=1, threads=1)
    assert measured.pinned in allowed if len(allowed) > 1 else measured.pinned is None
    assert (os.sched_getaffinity(0) if allowed else set()) == allowed  # the mask is given back


def test_signatures_follow_widths_not_weights():
    dense = deployable(zoo("lenet"))
    retrained = deployable(zoo("lenet"))
    with torch.no_grad():
        for parameter in retrained.parameters():
            parameter.add_(1.0)
    from backends import get_backend

    narrower = deployable(get_backend("scratch").prune(zoo("lenet"), "conv_all", 0.5, torch.randn(2, 3, 32, 32)).model)
    assert architecture_signature(dense) == architecture_signature(retrained) != architecture_signature(narrower)


def test_measure_is_one_architecture_through_the_cache():
    book = Measurements()
    model = zoo("lenet")
    first = measure(model, example_input=torch.randn(1, 3, 32, 32), batch=2, measurements=book)
    again = measure(zoo("lenet"), example_input=torch.randn(1, 3, 32, 32), batch=2, measurements=book)
    assert first == again and book.new == 1 and first.runs >= Protocol().min_blocks * Protocol().runs_per_block


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


ONE_LAYOUT = dict(
    models=("lenet",),
    backends=("scratch", "nni"),
    percents=(0.5,),
    base_epochs=1,
    finetune_epochs=0,
    limit_batches=2,
    limit_val_batches=1,
    scope="layer",
    random_control=False,
    other_layouts=False,
)


def test_cells_with_identical_widths_share_one_measurement_and_resume_reads_it(tmp_path, digits):
    spec = MatrixSpec(**ONE_LAYOUT, methods=("nni:l1", "scratch:conv_all"))  # both keep the top half per layer by L1
    rows = runner.run_matrix(spec, tmp_path / "out", base_root=tmp_path / "bases", data=digits)
    assert [r["status"] for r in rows] == ["ok", "ok"] and rows[0]["kept"] == rows[1]["kept"]
    for column in ("speedup_b1", "speedup_b64", "latency_b64_before_ms", "latency_b64_after_ms", "speedup_b64_low"):
        assert rows[0][column] == rows[1][column]
    lines = (tmp_path / "out" / store.LATENCY).read_text().splitlines()
    assert len(lines) == 4  # the dense alone and the pair, at batch 1 and 64: once for both cells
    wider = MatrixSpec(**ONE_LAYOUT, methods=("nni:l1", "scratch:conv_all", "scratch:random"))  # random: same widths
    rows = runner.run_matrix(wider, tmp_path / "out", base_root=tmp_path / "bases", data=digits)
    assert len(rows) == 3 and len((tmp_path / "out" / store.LATENCY).read_text().splitlines()) == 4
    assert len({r["speedup_b64"] for r in rows}) == 1


def test_merge_keeps_every_shards_measurements_and_one_figure_per_architecture(tmp_path, digits):
    spec = MatrixSpec(**ONE_LAYOUT, methods=("nni:l1", "scratch:conv_all"))  # the same widths, one cell per shard
    for shard in (0, 1):
        runner.run_matrix(spec, tmp_path / f"s{shard}", base_root=tmp_path / "bases", shard_of=(shard, 2), data=digits)
    separate = [store.read_rows(tmp_path / f"s{shard}")[0] for shard in (0, 1)]
    assert separate[0]["latency_keys"] == separate[1]["latency_keys"]  # one architecture, timed once in each shard
    assert bench_main(["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "all")]) == 0
    lines = {s: (tmp_path / s / store.LATENCY).read_text().splitlines() for s in ("s0", "s1", "all")}
    keys = {json.loads(line)["key"] for s in ("s0", "s1") for line in lines[s]}
    merged = [json.loads(line)["key"] for line in lines["all"]]
    assert set(merged) == keys and len(merged) == len(keys)
    rows = store.read_rows(tmp_path / "all")
    for column in ("speedup_b1", "speedup_b64", "latency_b64_before_ms", "latency_b64_after_ms"):
        assert rows[0][column] == rows[1][column]  # the merged directory's one measurement, in both rows


def test_unstable_figures_are_marked_in_results_csv_report_and_plot(tmp_path, digits):
    spec = MatrixSpec(**ONE_LAYOUT, methods=("scratch:conv_all",), latency_tolerance=1e-9, latency_cap_s=0.05)
    (row,) = runner.run_matrix(spec, tmp_path / "out", base_root=tmp_path / "bases", data=digits)
    assert set(row["unstable"].split(",")) == {
        "latency_b1_before_ms",
        "speedup_b1",
        "latency_b64_before_ms",
        "speedup_b64",
    }
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert table.loc[0, "unstable"] == row["unstable"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"{row['speedup_b64']:.2f}x ~" in report and "`~` unstable:" in report
    assert (tmp_path / "out" / "speedup_vs_macs.png").read_bytes()[:4] == b"\x89PNG"


def test_run_py_marks_unstable_timing_in_its_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Job, "protocol", Protocol(tolerance=1e-9, cap_s=0.05, min_blocks=2))
    assert run.main(["--step", "12", *quick_run(limit_batches=2)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1 base") or line.startswith("| 2 pruned")]
    assert len(rows) == 2 and all(line.rstrip(" |").endswith("unstable") for line in rows)
    assert "timing unstable: a latency figure's 95% interval stayed wider" in out


def test_run_py_samples_per_second_is_one_figure_per_architecture(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run.main(["--model", "dnn_2", "--step", "123", "--percent", "0", *quick_run(limit_batches=2)]) == 0
    results = {
        stage: json.loads((tmp_path / f"output/results/results_dnn_2_digits_{stage}.json").read_text())
        for stage in ("base_model", "pruning", "prune_model")
    }
    assert len({r["reasoningTime"] for r in results.values()}) == 1  # one architecture (nothing pruned): one figure
    assert all(r["latency"]["channels_last"]["b64_runs"] > 0 for r in results.values())


def test_latency_by_layout_reads_a_measurement_taken_before(tmp_path):
    book = Measurements(tmp_path / "latency.jsonl")
    model = deployable(zoo("lenet"))
    first = latency_by_layout(model, example_input=torch.randn(1, 3, 32, 32), batch=2, threads=1, measurements=book)
    reread = Measurements(tmp_path / "latency.jsonl")  # a resumed run
    again = latency_by_layout(model, example_input=torch.randn(1, 3, 32, 32), batch=2, threads=1, measurements=reread)
    assert first == again and reread.new == 0
