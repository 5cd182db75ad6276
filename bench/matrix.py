"""What a harness run compares: its settings, and the cells (model x backend x method x percent x seed) they expand
to."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import torch
from torch import nn

from algorithms.errors import PruningError
from backends import BACKEND_NAMES, get_backend
from backends.budget import ALLOCATIONS, parse_target
from models import MODEL_NAMES, build_model
from pipeline.budgeting import check_timeable
from pipeline.config import DEFAULT_EPOCHS, JobConfig
from pipeline.data.images import ImageDataset
from pipeline.deploy.latency import Protocol
from pipeline.deploy.metrics import DEPLOYED_LAYOUT, TIMED_LAYOUTS
from pipeline.errors import UsageError
from pipeline.job import QUANTIZE_MODES, check_budget, prune_context
from pipeline.train.runtime import Runtime

RANDOM_CONTROL = ("scratch", "random")
THIN = ("thin", "from scratch")  # the thin control's backend and method names in rows and tables


@dataclass(frozen=True)
class MatrixSpec:
    """The harness's settings. `fingerprint()` covers those that shape the numbers: runs that differ there do not
    mix."""

    models: tuple[str, ...] = ("lenet", "vgg")
    backends: tuple[str, ...] = ("scratch", "nni", "tp")
    methods: tuple[str, ...] = ()  # empty: each backend's default set; else names or backend:method pairs
    percents: tuple[float, ...] = (0.3, 0.5, 0.7)
    budgets: tuple[str, ...] = ()  # instead of percents: targets such as "macs=2x" (backends.budget), an axis
    allocations: tuple[str, ...] = ("uniform",)  # with budgets: how each cell's channels are shared among layers
    iterations: int = 1  # with budgets: prune -> fine-tune rounds that reach each budget
    thin_control: bool = False  # with budgets: the uniformly thinned model trained from scratch, per budget
    seeds: tuple[int, ...] = (0,)
    data_type: str = "digits"
    base_epochs: int | None = None  # None: the job's default for the dataset
    finetune_epochs: int = 2
    batch_size: int = 32
    val_batch_size: int = 256
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    limit_batches: int | None = None
    limit_val_batches: int | None = None
    prune_steps: int = 50
    scope: str | None = None  # None: each method's own scope
    threads: int = 1  # latency is timed at this many threads
    latency_tolerance: float = 0.025  # latency figures are timed until their 95% interval is within +-this
    latency_cap_s: float = 30.0  # ... or for at most this long per measurement, then marked unstable
    other_layouts: bool = True  # also time latency in NCHW, beside the deployed channels_last (the `_nchw` columns)
    random_control: bool = True
    scratch_control: bool = False
    distill: tuple[bool, ...] = (False,)  # axis: refine plainly and / or with the base model as teacher
    quantize: tuple[str, ...] = ("none",)  # axis: stop at fp32 and / or add step 4 (ptq, qat; nni-*: simulated)
    # where cells train and are timed (resolved: cpu, cuda:N); int8 kernels run on the CPU whatever it is
    device: str = "cpu"
    dataset: str | None = None  # content identity of a custom dataset (run_matrix sets it): other content, other table
    versions: dict[str, str] = field(default_factory=lambda: package_versions())

    @property
    def base_epoch_count(self) -> int:
        return self.base_epochs if self.base_epochs is not None else DEFAULT_EPOCHS.get(self.data_type, 2)

    @property
    def layouts(self) -> tuple[str, ...]:
        """The layouts latency is timed in, the deployed one first."""
        return TIMED_LAYOUTS if self.other_layouts else (DEPLOYED_LAYOUT,)

    @property
    def protocol(self) -> Protocol:
        return Protocol(tolerance=self.latency_tolerance, cap_s=self.latency_cap_s)

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    def runtime(self) -> Runtime:
        """The cells' compute settings: one process on the spec's device, fp32 without autocast (the harness compares
        methods, not precisions; CUDA's default TF32 convolutions apply on GPUs that have them)."""
        return Runtime(device=torch.device(self.device))

    def fingerprint(self) -> dict[str, object]:
        """Everything two result sets must share to sit in one table (the matrix's extent may differ).

        The device counts by kind (shards on cuda:0 and cuda:1 of one node mix); `latency_layout` is the layout latency
        is timed in.
        """
        extent = {
            "models",
            "backends",
            "methods",
            "percents",
            "budgets",
            "allocations",
            "thin_control",
            "seeds",
            "random_control",
            "scratch_control",
            "distill",
            "quantize",
        }
        settings = {k: v for k, v in asdict(self).items() if k not in extent}
        # 8 and "the default for digits" are the same run
        return {
            **settings,
            "base_epochs": self.base_epoch_count,
            "device": self.device_type,
            "latency_layout": DEPLOYED_LAYOUT,
        }


@dataclass(frozen=True, order=True)
class Cell:
    model: str
    seed: int
    backend: str
    method: str
    percent: float  # 0 for a budget cell
    distill: bool = False
    quantize: str = "none"
    budget: str = ""  # a target ("macs=2x") instead of the percent
    allocation: str = ""  # how that budget is shared among layers

    @property
    def key(self) -> str:
        """Prune-only cells keep the keys they always had; the compression axes add a suffix; a budget cell names its
        budget and allocation where others name their percent."""
        suffix = ("/kd" if self.distill else "") + (f"/int8-{self.quantize}" if self.quantize != "none" else "")
        amount = f"{self.budget}/{self.allocation}" if self.budget else f"{self.percent}"
        return f"{self.model}/{self.backend}/{self.method}/{amount}/seed{self.seed}{suffix}"


def package_versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    for package in ("torchvision", "nni", "torch-pruning"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def offered_methods() -> str:
    return "; ".join(f"{name} offers {', '.join(get_backend(name).methods)}" for name in BACKEND_NAMES)


def methods_for(spec: MatrixSpec, probe: nn.Module) -> list[tuple[str, str]]:
    """(backend, method) pairs for one model: the requested ones, or each backend's defaults, plus the random
    control."""
    pairs: list[tuple[str, str]] = []
    if not spec.methods:
        pairs = [(b, m) for b in spec.backends for m in get_backend(b).default_methods(probe)]
    for item in spec.methods:
        if ":" in item:
            backend, method = item.split(":", 1)
            if backend not in spec.backends:
                raise UsageError(
                    f"--methods names {item!r} but {backend!r} is not in --backends ({', '.join(spec.backends)})"
                )
            if method not in get_backend(backend).methods:
                raise UsageError(f"backend {backend} has no method {method!r}; {offered_methods()}")
            pairs.append((backend, method))
            continue
        offering = [b for b in spec.backends if item in get_backend(b).methods]
        if not offering:
            raise UsageError(f"no backend in --backends offers method {item!r}; {offered_methods()}")
        pairs.extend((b, item) for b in offering)
    if spec.random_control:
        pairs.append(RANDOM_CONTROL)
    return list(dict.fromkeys(pairs))


def check_names(spec: MatrixSpec) -> None:
    """The checks that need no dataset: run first, so a typo is reported before a dataset is looked for."""
    if not (spec.models and spec.backends and (spec.percents or spec.budgets) and spec.seeds):
        raise UsageError(
            "the matrix is empty: --models, --backends, --percents (or --budgets) and --seeds each need a value"
        )
    if spec.budgets and spec.percents:
        raise UsageError("--budgets and --percents both say how much to prune; give one of them")
    for budget in spec.budgets:
        try:
            parse_target(budget)
        except PruningError as error:
            raise UsageError(f"--budgets: {error}") from None
    unknown_allocations = [a for a in spec.allocations if a not in ALLOCATIONS]
    if unknown_allocations or not spec.allocations:
        raise UsageError(
            f"--allocations takes {', '.join(ALLOCATIONS)} (comma-separated), got {','.join(spec.allocations)!r}"
        )
    if (spec.thin_control or spec.iterations != 1 or spec.allocations != ("uniform",)) and not spec.budgets:
        raise UsageError(
            "--allocations, --iterations and --thin_control shape budgets: add --budgets (e.g. macs:2x,4x)"
        )
    for name, known, flag in ((spec.models, MODEL_NAMES, "--models"), (spec.backends, BACKEND_NAMES, "--backends")):
        unknown = [n for n in name if n not in known]
        if unknown:
            raise UsageError(f"unknown {flag[2:-1]} {unknown[0]!r} in {flag}; choose from: {', '.join(known)}")
    for percent in spec.percents:
        if not 0.0 <= percent < 1.0:
            raise UsageError(
                f"percent {percent:g} in --percents is outside [0, 1): it is the fraction of channels removed"
            )
    unknown = [mode for mode in spec.quantize if mode not in ("none", *QUANTIZE_MODES)]
    if unknown or not spec.quantize or not spec.distill:
        raise UsageError(
            f"--quantize takes none, {', '.join(QUANTIZE_MODES)} (comma-separated), got {','.join(spec.quantize)!r}; "
            "--distill takes off, on"
        )


def job_config(spec: MatrixSpec, model: str, seed: int, **where: Any) -> JobConfig:
    """The run.py config a cell (or its base) would be run with; only the directories and the pruning request vary."""
    return JobConfig(
        model=model,
        data_type=spec.data_type,
        seed=seed,
        base_epochs=spec.base_epoch_count,
        refine_epochs=spec.finetune_epochs,
        batch_size=spec.batch_size,
        val_batch_size=spec.val_batch_size,
        learning_rate=spec.learning_rate,
        optimizer=spec.optimizer,
        limit_batches=spec.limit_batches,
        limit_val_batches=spec.limit_val_batches,
        prune_steps=spec.prune_steps,
        scope=spec.scope,
        echo_epochs=False,
        throughput=False,
        iterations=spec.iterations,
        **where,
    )


def expand(spec: MatrixSpec, data: ImageDataset) -> list[Cell]:
    """Every cell of the matrix in a fixed order; refuses an impossible combination before anything is trained."""
    check_names(spec)
    cells = []
    for model in spec.models:
        try:
            with torch.device("meta"):  # structure only, no weights initialised
                probe = build_model(model, data.input_shape, data.num_classes)
        except ValueError as error:
            raise UsageError(f"{error} (dataset {spec.data_type} has {tuple(data.input_shape)} images)") from None
        # what every cell's job offers its backend
        context = prune_context(job_config(spec, model, spec.seeds[0]), data)
        for backend, method in methods_for(spec, probe):
            for percent in spec.percents or (0.5,):
                try:
                    get_backend(backend).validate(probe, method, percent, spec.scope, context=context)
                except PruningError as error:
                    raise UsageError(f"{backend}:{method} cannot prune {model}: {error}. {offered_methods()}") from None
            if spec.budgets:
                for budget in spec.budgets:
                    for allocation in spec.allocations:
                        check_timeable(parse_target(budget), torch.device(spec.device), allocation=allocation)
                    check_budget(
                        job_config(
                            spec,
                            model,
                            spec.seeds[0],
                            backend=backend,
                            method=method,
                            target=budget,
                            allocation=spec.allocations[0],
                        ),
                        data,
                        method,
                        "23",
                        torch.device(spec.device),
                    )
            amounts = [(0.0, b, a) for b in spec.budgets for a in spec.allocations] or [
                (p, "", "") for p in spec.percents
            ]
            cells += [
                Cell(model, seed, backend, method, p, kd, q, b, a)
                for seed in spec.seeds
                for p, b, a in amounts
                for kd in spec.distill
                for q in spec.quantize
            ]
        if spec.thin_control:
            for budget in spec.budgets:  # the thin model is a uniform scratch prune of the same architecture
                check_budget(
                    job_config(spec, model, spec.seeds[0], backend="scratch", method="conv_all", target=budget),
                    data,
                    "conv_all",
                    "23",
                    torch.device(spec.device),
                )
            cells += [
                Cell(model, seed, THIN[0], THIN[1], 0.0, False, "none", b, "uniform")
                for seed in spec.seeds
                for b in spec.budgets
            ]
    return sorted(set(cells))


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' with 0 <= i < n (a Slurm array or Kubernetes indexed job passes its 0-based index)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r} must be i/n, e.g. 0/4 (shard index from 0, number of shards)") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(
            f"--shard {text}: the index must be in 0..{max(count - 1, 0)} and the count positive (e.g. "
            f"0/{max(count, 2)})"
        )
    return index, count


def shard(cells: list[Cell], index: int, count: int) -> list[Cell]:
    """A contiguous, deterministic slice: neighbouring cells share a model and seed, so each shard trains few base
    models."""
    size, extra = divmod(len(cells), count)
    start = index * size + min(index, extra)
    return cells[start : start + size + (index < extra)]


def base_key(
    spec: MatrixSpec, model: str, seed: int, input_shape: tuple[int, ...], num_train: int, dataset: str | None = None
) -> str:
    """The base checkpoint's cache key: a hash of every setting that shapes the base model. `dataset`: the content
    identity of a custom dataset (two datasets under one name, or one name read from two --dataset_dir folders, train
    two bases)."""
    shaping = {
        "model": model,
        "seed": seed,
        "data_type": spec.data_type,
        "input_shape": list(input_shape),
        "num_train": num_train,
        "epochs": spec.base_epoch_count,
        "batch_size": spec.batch_size,
        "learning_rate": spec.learning_rate,
        "optimizer": spec.optimizer,
        "limit_batches": spec.limit_batches,
        "torch": spec.versions.get("torch"),
        # the cached base figures are measured on this many test images
        "limit_val_batches": spec.limit_val_batches,
        "val_batch_size": spec.val_batch_size,
    }
    if spec.device_type != "cpu":  # a GPU trains other weights (other kernels); CPU bases keep the keys they always had
        shaping["device"] = spec.device_type
    if dataset is not None:  # builtin datasets are fixed by their name and keep the keys they always had
        shaping["dataset"] = dataset
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:12]
    return f"{model}-{spec.data_type}-seed{seed}-{digest}"
