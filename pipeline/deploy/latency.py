"""Latency that holds on a busy machine: time in interleaved blocks until the 95% interval is tight, flag what is not.

One measurement times one or more models (the first is the reference) in blocks. Within a block the models take turns,
run by run (three runs each), so load that comes and goes hits them alike; each block gives every model its median
time. The order of the models alternates from block to block, and every block opens with an untimed run of the model
that goes first, so no model always runs right after the bookkeeping between blocks (cold caches there would bias a
ratio). From `min_blocks` on, the 95% t-interval of the mean log block time (one model) or of the mean log ratio
(reference over candidate, paired within blocks) is compared with +-`tolerance`; the measurement stops once every
interval is inside it at two looks in a row, or at `cap_s`, and then the figure is marked unstable. Before the blocks
each model warms up until its times stop falling. The timing thread is pinned to the idlest allowed core where the OS
allows (Linux, one thread).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from algorithms.modules import eval_mode
from pipeline.atomic import append_json_line, read_json_lines
from pipeline.deploy.metrics import DEPLOYED_LAYOUT, LAYOUTS, TIMED_LAYOUTS, deployable, in_layout
from pipeline.train.runtime import float32_name, synchronize

# Student's t, 97.5% quantile, by degrees of freedom (scipy.stats.t.ppf(0.975, df)); 1.96 past the table
T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


@dataclass(frozen=True)
class Protocol:
    """How long and how hard to try for a stable figure."""

    tolerance: float = 0.025  # the 95% interval must lie within +-2.5%: two measurements then agree within 5%
    min_blocks: int = 4
    runs_per_block: int = 3  # runs of each model per block, taking turns; the block keeps each model's median
    cap_s: float = 30.0  # wall-clock limit of one measurement (warm-up included); past it the figure is unstable
    warmup_max: int = 30  # warm-up runs at most, per model
    pin: bool = True  # pin the timing thread to one core where the OS allows


DEFAULT = Protocol()


@dataclass(frozen=True)
class Timing:
    """One model's time per forward: `median`, the geometric mean of its block medians (each block's median over its
    runs), with that figure's 95% interval, the timed runs behind it, and whether the interval came within the
    tolerance."""

    median: float
    low: float
    high: float
    runs: int
    stable: bool


@dataclass(frozen=True)
class Speedup:
    """Reference time / candidate time, from block pairs: geometric mean and its 95% interval."""

    value: float
    low: float
    high: float
    stable: bool


@dataclass(frozen=True)
class Measurement:
    timings: list[Timing]  # one per model, the reference first
    speedups: list[Speedup]  # one per candidate (models[1:])
    blocks: int
    seconds: float
    pinned: int | None  # the core the timing thread ran on, or None where it could not be pinned
    key: str = ""  # what it is kept under (pipeline.deploy.latency.measurement_key)

    def as_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Measurement:
        return cls(
            [Timing(**t) for t in data["timings"]],  # type: ignore[union-attr]
            [Speedup(**s) for s in data["speedups"]],  # type: ignore[union-attr]
            int(data["blocks"]),  # type: ignore[arg-type]
            float(data["seconds"]),  # type: ignore[arg-type]
            data["pinned"],  # type: ignore[arg-type]
            str(data.get("key", "")),
        )

    @property
    def stable(self) -> bool:
        return all(s.stable for s in self.speedups) if self.speedups else all(t.stable for t in self.timings)


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and 95% half-width (Student's t) of a few values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.inf
    quantile = T975[len(values) - 2] if len(values) - 2 < len(T975) else 1.96
    return mean, quantile * statistics.stdev(values) / math.sqrt(len(values))


def measure_models(
    models: list[nn.Module],
    *,
    example_input: torch.Tensor,
    batch: int,
    layout_format: torch.memory_format = torch.contiguous_format,
    threads: int | None = None,
    protocol: Protocol = DEFAULT,
    timer: Callable[[], float] = time.perf_counter,
) -> Measurement:
    """Time `models` (the first is the reference) at `batch` in interleaved blocks, by `protocol`; inference mode, eval.
    Image batches are fed in `layout_format` (the models' weights are the caller's to convert). On CUDA every run is
    bracketed by a synchronisation."""
    x = example_input[:1].expand(batch, *example_input.shape[1:])
    x = x.contiguous(memory_format=layout_format) if x.ndim == 4 else x.contiguous()
    device = x.device
    started = timer()

    def run(model: nn.Module) -> float:
        synchronize(device)
        begin = timer()
        model(x)
        synchronize(device)
        return timer() - begin

    # one thread on a CPU is pinned: torch's other threads (with more) would not follow the mask, nor share one core
    with _threads(threads), _pinned(protocol.pin and device.type == "cpu" and torch.get_num_threads() == 1) as core:
        with eval_mode(*models), torch.inference_mode():
            for model in models:
                _warm_up(run, model, protocol, timer)
            blocks: list[list[list[float]]] = []  # block -> model -> run times
            passed = 0  # looks in a row at which every interval was within the tolerance
            while True:
                order = list(range(len(models)))[:: 1 if len(blocks) % 2 == 0 else -1]
                run(models[order[0]])  # untimed: whatever the bookkeeping before this block cooled, it warms again
                block: list[list[float]] = [[] for _ in models]
                for _ in range(protocol.runs_per_block):
                    for index in order:
                        block[index].append(run(models[index]))
                blocks.append(block)
                timings, speedups = _summarise(blocks, protocol.tolerance)
                settled = all(s.stable for s in speedups) if speedups else all(t.stable for t in timings)
                passed = passed + 1 if settled and len(blocks) >= protocol.min_blocks else 0
                out_of_time = timer() - started > protocol.cap_s and len(blocks) >= 2
                if passed >= 2 or out_of_time:
                    break
    return Measurement(timings, speedups, len(blocks), round(timer() - started, 3), core)


def _warm_up(
    run: Callable[[nn.Module], float], model: nn.Module, protocol: Protocol, timer: Callable[[], float]
) -> None:
    """Run until times stop falling: three runs in a row none of which is 2% faster than the fastest before them
    (caches, the allocator and oneDNN's kernel choice settle in the first runs), within the warm-up budget of this
    model (a sixth of the measurement's cap, at most `warmup_max` runs)."""
    started = timer()
    fastest, calm, runs = run(model), 0, 1
    while calm < 3 and runs < protocol.warmup_max and timer() - started < protocol.cap_s / 6:
        time_taken = run(model)
        runs += 1
        calm = calm + 1 if time_taken >= 0.98 * fastest else 0
        fastest = min(fastest, time_taken)


def _summarise(blocks: list[list[list[float]]], tolerance: float) -> tuple[list[Timing], list[Speedup]]:
    """Each model's timing and each candidate's speedup from the blocks so far."""
    limit = math.log1p(tolerance)
    medians = [[statistics.median(block[m]) for block in blocks] for m in range(len(blocks[0]))]
    timings = []
    for m, per_block in enumerate(medians):
        mean, half = t_interval([math.log(v) for v in per_block])
        runs = sum(len(block[m]) for block in blocks)
        timings.append(Timing(math.exp(mean), math.exp(mean - half), math.exp(mean + half), runs, half <= limit))
    speedups = []
    for m in range(1, len(medians)):
        mean, half = t_interval([math.log(r / c) for r, c in zip(medians[0], medians[m], strict=True)])
        speedups.append(Speedup(math.exp(mean), math.exp(mean - half), math.exp(mean + half), half <= limit))
    return timings, speedups


@contextlib.contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _pinned(wanted: bool) -> Iterator[int | None]:
    """Pin the calling thread (the one that times, and with one torch thread the one that computes) to the idlest core
    it may run on (over a 100 ms look at /proc/stat), then give its mask back. A process that may run on one core only
    is pinned already: that core. None where the OS offers no affinity, or refuses it."""
    allowed = os.sched_getaffinity(0) if wanted and hasattr(os, "sched_getaffinity") else set()
    if len(allowed) == 1:
        yield next(iter(allowed))
        return
    core = _idlest(allowed) if allowed else None
    try:
        if core is not None:
            os.sched_setaffinity(0, {core})
    except OSError:
        core = None
    try:
        yield core
    finally:
        if core is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, allowed)


def _idlest(allowed: set[int]) -> int:
    """The allowed core that was idle longest over a short look (the lowest-numbered one where /proc/stat is absent)."""

    def idle() -> dict[int, int]:
        with contextlib.suppress(OSError):
            found = {}
            for line in Path("/proc/stat").read_text().splitlines():
                match = re.match(r"cpu(\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", line)
                if match:
                    found[int(match.group(1))] = int(match.group(5)) + int(match.group(6))  # idle + iowait jiffies
            return found
        return {}

    before = idle()
    time.sleep(0.1)
    after = idle()
    gained = {core: after.get(core, 0) - before.get(core, 0) for core in allowed}
    return max(sorted(allowed), key=lambda core: gained[core])


def device_name(device: torch.device | str) -> str:
    """The processor a figure is measured on: the GPU's name on CUDA, else the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def architecture_signature(model: nn.Module) -> str:
    """A hash of what decides a model's speed, not its weights: the graph it runs (a traced model's code), each module's
    type, configuration and tensor shapes and dtypes. Models of different weights but the same widths share it;
    quantization scales and zero points (weights-dependent numbers) are left out."""
    digest = hashlib.sha256(type(model).__name__.encode())
    code = getattr(model, "code", None)
    if isinstance(code, str):
        digest.update(code.encode())
    for name, module in model.named_modules():
        settings = re.sub(r"(scale|zero_point)=[^,)]*", "", module.extra_repr())
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        shapes = [(key, tuple(t.shape), str(t.dtype)) for key, t in tensors]
        digest.update(f"{name}|{type(module).__name__}|{settings}|{shapes}\n".encode())
    return digest.hexdigest()[:16]


def measurement_key(models: list[nn.Module], **conditions: object) -> str:
    """What a measurement is kept under: the models' architectures (the reference first) and the conditions (batch,
    layout, threads, device, dtype, tolerance): a cell whose pruned model has another's widths reads that one's."""
    parts = [architecture_signature(model) for model in models] + [f"{k}={conditions[k]}" for k in sorted(conditions)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


class Measurements:
    """Measurements by key: in memory, and given a file, in a JSON-lines file that resumed runs read back (each new one
    appended under a lock, so runs that share the file lose none). A figure read back that had not settled is taken
    again, once per process: a resumed run on a quieter machine (or with a longer cap) gets its clean figure."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.known: dict[str, Measurement] = {}
        if path is not None:
            self.known = {row["key"]: Measurement.from_json(row["measurement"]) for row in read_json_lines(path, "key")}
        self.fresh: set[str] = set()  # measured in this process

    @property
    def new(self) -> int:
        return len(self.fresh)

    def get_or_measure(self, key: str, measure: Callable[[], Measurement], **described: object) -> Measurement:
        known = self.known.get(key)
        if known is None or (not known.stable and key not in self.fresh):
            self.known[key] = replace(measure(), key=key)
            self.fresh.add(key)
            if self.path is not None:
                append_json_line(self.path, {"key": key, **described, "measurement": self.known[key].as_json()})
        return self.known[key]


def latency_by_layout(
    *models: nn.Module,
    example_input: torch.Tensor,
    batch: int,
    threads: int | None = None,
    layouts: tuple[str, ...] = TIMED_LAYOUTS,
    protocol: Protocol = DEFAULT,
    measurements: Measurements | None = None,
) -> dict[str, Measurement]:
    """The models (the first is the reference) measured together in every layout of `layouts`, the deployed one first;
    read from `measurements` where an identical measurement was taken before. Converts the models in place (they end
    in the last layout timed): pass copies you own, such as `deployable`'s."""
    measurements = measurements if measurements is not None else Measurements()
    out = {}
    for layout in layouts:
        for model in models:
            in_layout(model, layout)
        conditions = {
            "batch": batch,
            "layout": layout,
            "threads": threads,
            "device": f"{example_input.device.type} {device_name(example_input.device)}",  # cuda:0 and :1 share
            "dtype": ",".join(model_dtype(model, example_input.device) for model in models),
            "torch": torch.__version__,
            "tolerance": protocol.tolerance,
        }
        out[layout] = measurements.get_or_measure(
            measurement_key(list(models), **conditions),
            lambda layout=layout: measure_models(
                list(models),
                example_input=example_input,
                batch=batch,
                layout_format=LAYOUTS[layout],
                threads=threads,
                protocol=protocol,
            ),
            **conditions,
        )
    return out


def measure(
    model: nn.Module,
    *,
    example_input: torch.Tensor,
    batch: int,
    layout: str = DEPLOYED_LAYOUT,
    threads: int | None = 1,
    protocol: Protocol = DEFAULT,
    measurements: Measurements | None = None,
) -> Timing:
    """One architecture's time per forward at `batch` in `layout`, as deployed (BatchNorm folded), by the protocol:
    what a latency lookup table is built from. `model` is left as it was."""
    runnable = deployable(model).to(example_input.device)
    timed = latency_by_layout(
        runnable,
        example_input=example_input,
        batch=batch,
        threads=threads,
        layouts=(layout,),
        protocol=protocol,
        measurements=measurements,
    )
    return timed[layout].timings[0]


def model_dtype(model: nn.Module, device: torch.device) -> str:
    """What a model computes in, for the record: the float32 name of its device (TF32 where CUDA allows it), or int8
    for a model whose layers are quantized (no float weights left)."""
    first = next(iter(model.parameters()), None)
    if first is None:
        return "int8"
    return float32_name(device) if first.dtype == torch.float32 else str(first.dtype).removeprefix("torch.")
