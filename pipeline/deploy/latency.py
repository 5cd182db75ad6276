"""Latency that holds on a busy machine: time in interleaved blocks until the 95% interval is tight, flag what is not.

One measurement times one or more models (the first is the reference) in blocks. Within a block the models take turns,
run by run, so load that comes and goes hits them alike; each block gives every model its median time. After at least
`min_blocks` blocks, the 95% t-interval of the mean log block time (one model) or of the mean log time ratio (reference
over candidate, paired within blocks) is compared with +-`tolerance`; blocks are added until every interval is inside
it, or until `cap_s` has passed, and then the figure is marked unstable. Before the blocks each model warms up until its
times stop falling. The timing thread is pinned to the idlest allowed core where the OS allows (Linux).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from algorithms.modules import eval_mode
from pipeline.atomic import append_json_line, read_json_lines
from pipeline.deploy.metrics import DEPLOYED_LAYOUT, LAYOUTS, TIMED_LAYOUTS, deployable, in_layout
from pipeline.train.runtime import float32_name, synchronize


@dataclass(frozen=True)
class Protocol:
    """How long and how hard to try for a stable figure."""

    tolerance: float = 0.025  # the 95% interval must lie within +-2.5%: two measurements then agree within 5%
    min_blocks: int = 4
    runs_per_block: int = 1  # runs of each model per block (the block keeps their median): one pairs run by run
    cap_s: float = 30.0  # wall-clock limit of one measurement (warm-up included); past it the figure is unstable
    warmup_max: int = 30  # warm-up runs at most, per model
    pin: bool = True  # pin the timing thread to one core where the OS allows


DEFAULT = Protocol()


@dataclass(frozen=True)
class Timing:
    """One model's time per forward: median over every timed run, a 95% interval of its typical (geometric mean block)
    time, the runs behind it, and whether that interval came within the tolerance."""

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
        )


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and 95% half-width (Student's t) of a few values."""
    from scipy.stats import t as student_t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.inf
    return mean, float(student_t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


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
                _warm_up(run, model, protocol, started, timer)
            blocks: list[list[list[float]]] = []  # block -> model -> run times
            while True:
                block: list[list[float]] = [[] for _ in models]
                for _ in range(protocol.runs_per_block):
                    for times, model in zip(block, models, strict=True):
                        times.append(run(model))
                blocks.append(block)
                timings, speedups = _summarise(blocks, protocol.tolerance)
                settled = all(s.stable for s in speedups) if speedups else all(t.stable for t in timings)
                out_of_time = timer() - started > protocol.cap_s and len(blocks) >= 2
                if (len(blocks) >= protocol.min_blocks and settled) or out_of_time:
                    break
    return Measurement(timings, speedups, len(blocks), round(timer() - started, 3), core)


def _warm_up(
    run: Callable[[nn.Module], float], model: nn.Module, protocol: Protocol, started: float, timer: Callable[[], float]
) -> None:
    """Run until times stop falling: a run no more than 2% faster than the fastest before it (caches, the allocator and
    oneDNN's kernel choice settle in the first runs), within the warm-up and time budgets."""
    times = [run(model)]
    while len(times) < protocol.warmup_max and timer() - started < protocol.cap_s / 3:
        times.append(run(model))
        if times[-1] >= 0.98 * min(times[:-1]):
            return


def _summarise(blocks: list[list[list[float]]], tolerance: float) -> tuple[list[Timing], list[Speedup]]:
    """Each model's timing and each candidate's speedup from the blocks so far."""
    limit = math.log1p(tolerance)
    medians = [[statistics.median(block[m]) for block in blocks] for m in range(len(blocks[0]))]
    timings = []
    for m, per_block in enumerate(medians):
        mean, half = t_interval([math.log(v) for v in per_block])
        every = [t for block in blocks for t in block[m]]
        timings.append(
            Timing(statistics.median(every), math.exp(mean - half), math.exp(mean + half), len(every), half <= limit)
        )
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
    """Pin this process to the idlest core it may run on (over a 100 ms look at /proc/stat), then give the mask back.
    torch's intra-op threads are created by this process and inherit it. None where that is not possible."""
    allowed = os.sched_getaffinity(0) if wanted and hasattr(os, "sched_getaffinity") else set()
    if len(allowed) < 2:
        yield None
        return
    core = _idlest(allowed)
    os.sched_setaffinity(0, {core})
    try:
        yield core
    finally:
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
    appended under a lock, so runs that share the file lose none)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.known: dict[str, Measurement] = {}
        if path is not None:
            self.known = {row["key"]: Measurement.from_json(row["measurement"]) for row in read_json_lines(path, "key")}
        self.new = 0  # measurements taken (not read back) in this process

    def get_or_measure(self, key: str, measure: Callable[[], Measurement], **described: object) -> Measurement:
        if key not in self.known:
            self.known[key] = measure()
            self.new += 1
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
    device_name: str = "",
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
            "device": f"{example_input.device} {device_name}",
            "dtype": model_dtype(models[0], example_input.device),
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
