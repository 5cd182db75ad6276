"""The job: 1 = train the base model, 2 = prune it, 3 = fine-tune ("refine") it, 4 = quantize it to int8.

run.py drives it from flags, the comparison harness once per cell; both through a JobConfig.
Each step writes a snapshot, a results JSON (and steps 1 and 3 a per-epoch log) and returns its figures.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from algorithms.masks import apply_masks
from backends import JobContext, PruneResult, get_backend
from backends.budget import (
    ALLOCATIONS,
    Target,
    check_reachable,
    measured_cost,
    parse_target,
    plan_budget,
    prune_to_budget,
)
from backends.nni_quantize import QUANTIZERS as NNI_QUANTIZERS
from backends.nni_quantize import RETRAINS as NNI_RETRAINS
from backends.nni_quantize import check_available as check_nni_quantizers
from backends.nni_quantize import fake_quantize
from models import build_model
from pipeline import lineage
from pipeline.budgeting import CACHE as BUDGET_CACHE
from pipeline.budgeting import budget_inputs, latency_timer
from pipeline.config import STAGES, JobConfig
from pipeline.data.images import ImageDataset
from pipeline.deploy import quantize
from pipeline.deploy.latency import DEFAULT, Measurements, Protocol, latency_by_layout, model_dtype
from pipeline.deploy.metrics import (
    DEPLOYED_LAYOUT,
    LATENCY_BATCHES,
    LAYOUT_NAMES,
    LAYOUT_SUFFIXES,
    TIMED_LAYOUTS,
    count_macs,
    count_params,
    deployable,
    model_size_mb,
)
from pipeline.errors import ProcessError, UsageError
from pipeline.reporting import EpochLog, epoch_log, results_payload, write_results
from pipeline.snapshots import META_FILE, WEIGHTS_FILE, load_model, save_snapshot
from pipeline.train.distill import Distillation, FeatureDistillation, feature_layers
from pipeline.train.distributed import barrier, broadcast_parameters
from pipeline.train.loop import EvalResult, LossFunction, cross_entropy, evaluate, make_optimizer, train
from pipeline.train.runtime import CPU, Runtime

STEP_NAMES = {"1": "base", "2": "prune", "3": "refine", "4": "quantize"}
QUANTIZE_MODES = (*quantize.MODES, *NNI_QUANTIZERS)  # real int8 kernels, then NNI's simulated int8 (accuracy only)
RETRAINING_QUANTIZERS = ("qat", *NNI_RETRAINS)


def check_request(
    config: JobConfig, data: ImageDataset, steps: str = "123", device: torch.device | None = None
) -> None:
    """Refuse an impossible request (model too big for the images, unknown method, ...) before any training; a latency
    budget is checked on `device`, where the job will time it."""
    try:
        with torch.device("meta"):  # structure only: no weights are initialised for the check
            probe = build_model(config.model, data.input_shape, data.num_classes)
    except ValueError as error:
        raise UsageError(f"{error} (dataset {config.data_type} has {data.input_shape} images)") from None
    if "1" in steps and "2" not in steps and ("3" in steps or "4" in steps):
        later = "refine" if "3" in steps else "quantize"
        raise UsageError(
            f"--step {steps} would {later} an older pruned model, not one pruned from the base this run trains; add 2 "
            "(--step 12...)"
        )
    check_threshold(config.threshold)
    check_compression(config, steps)
    if config.distill and config.kd_features:
        feature_layers(probe, config.kd_features)  # names checked before any training
    if "2" in steps:
        backend = get_backend(config.backend)
        method = config.method or backend.default_method(probe)
        backend.validate(
            probe, method, config.percent, config.scope, exclude=config.exclude, context=prune_context(config, data)
        )
        if "4" in steps and config.quantize in RETRAINING_QUANTIZERS and not backend.physical(method):
            raise UsageError(
                f"--quantize {config.quantize} would retrain the zeroed weights of {method} (masked, not smaller); use "
                "--quantize ptq"
            )
        if config.target is not None:
            check_budget(config, data, method, steps, device)
    elif config.target is not None and "3" in steps:
        check_iterations(config, steps)  # the later rounds of an iterative prune run in step 3
    elif config.target is not None and steps == "1":
        raise UsageError(f"--target sets how much step 2 prunes, and --step {steps} does not prune; add 2 or drop it")


def check_budget(
    config: JobConfig, data: ImageDataset, method: str, steps: str, device: torch.device | None = None
) -> None:
    """A budget that cannot be met, or cannot be timed, is refused before any training: reachability depends on the
    architecture only (the narrowest network the backend can make), so a freshly built model answers it."""
    target = parse_target(config.target)
    check_iterations(config, steps)
    backend = get_backend(config.backend)
    if not backend.physical(method):
        raise UsageError(
            f"--target needs a method that removes channels; {method} zeroes single weights, so the model keeps its "
            "cost (use --percent with it)"
        )
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes).eval()
    example = data.example_input(1)
    latency_of = latency_timer(target, example, Measurements(), device)
    budget = plan_budget(
        backend, model, method, example, exclude=config.exclude, round_to=config.round_to, latency_of=latency_of
    )
    check_reachable(budget, target, f"{config.backend}:{method}")


def check_iterations(config: JobConfig, steps: str) -> None:
    """Each prune -> fine-tune round needs a fine-tuning epoch of its own; rounds after the first run in step 3."""
    if config.allocation not in ALLOCATIONS:
        raise UsageError(f"unknown --allocation {config.allocation!r}; choose one of: {', '.join(ALLOCATIONS)}")
    if config.iterations < 1 or ("3" in steps and config.iterations > max(config.epochs("3"), 1)):
        raise UsageError(
            f"--iterations {config.iterations} needs 1 to {max(config.epochs('3'), 1)} rounds: each prune -> fine-tune "
            "round takes at least one of the fine-tuning epochs"
        )
    if config.iterations > 1 and "3" not in steps:
        raise UsageError("--iterations alternates pruning and fine-tuning: add 3 to --step")


def prune_context(config: JobConfig, data: ImageDataset) -> JobContext:
    """What this job offers the backend: its training data (seeded shuffles) and the settings a backend may read."""
    generator = torch.Generator().manual_seed(config.seed)
    return JobContext(
        train_batches=lambda: data.batches("train", config.batch_size, generator),
        training_steps=config.prune_steps,
        learning_rate=config.learning_rate,
        round_to=config.round_to,
        threshold=config.threshold,
        schedule_over=config.schedule_over,
        verbose=config.verbose,
    )


def check_threshold(threshold: float) -> None:
    """conv_threshold counts |w| above the threshold: a value that is not a non-negative number decides nothing (one
    that ties every filter's score is refused when the weights are known, by the backend)."""
    if not math.isfinite(threshold) or threshold < 0:
        raise UsageError(
            f"--threshold must be a non-negative number (a weight magnitude such as 0.06), got {threshold}"
        )


def check_compression(config: JobConfig, steps: str) -> None:
    """Distillation and quantization settings, and that step 4 will find a model, before anything trains."""
    if config.distill and "3" not in steps:
        raise UsageError("--distill applies to step 3 (refine); add 3 to --step")
    if not 0.0 <= config.kd_alpha <= 1.0:
        raise UsageError(
            f"--kd_alpha must be in [0, 1] (the weight of the teacher's soft targets), got {config.kd_alpha}"
        )
    if not (math.isfinite(config.kd_temperature) and config.kd_temperature > 0):
        raise UsageError(f"--kd_temperature must be positive, got {config.kd_temperature}")
    if config.kd_features and not config.distill:
        raise UsageError("--kd_features adds feature maps to knowledge distillation; add --distill")
    if not (math.isfinite(config.kd_feature_weight) and config.kd_feature_weight >= 0):
        raise UsageError(f"--kd_feature_weight must be non-negative, got {config.kd_feature_weight}")
    if config.quantize not in QUANTIZE_MODES:
        raise UsageError(f"unknown --quantize {config.quantize!r}; choose one of: {', '.join(QUANTIZE_MODES)}")
    if "4" not in steps:
        return
    if config.quantize in NNI_QUANTIZERS:
        check_nni_quantizers()  # a missing NNI is found now, not after three steps of training
    if config.quantize in RETRAINING_QUANTIZERS and config.qat_epochs < 1:
        raise UsageError(
            f"--quantize {config.quantize} needs at least one --qat_epochs of quantization-aware training, got "
            f"{config.qat_epochs}"
        )
    if config.quantize in ("ptq", "nni-ptq") and config.calib_batches < 1:
        raise UsageError(f"--calib_batches must be at least 1, got {config.calib_batches}")
    if "2" not in steps and "3" not in steps and not any((config.load_root / STAGES[s]).is_dir() for s in ("2", "3")):
        raise UsageError(
            f"step 4 needs a pruned or refined model and {config.load_root} has neither; run --step 2 (and 3) first, "
            "or pass --model_load_dir"
        )


class Job:
    """One train / prune / refine sequence over one dataset; remembers its models, figures and files.

    Under several processes (torchrun) every process trains steps 1 and 3 together; rank 0 alone prunes (step 2),
    quantizes (step 4) and writes every file, and the others wait for it at a barrier, then read what it wrote.
    """

    protocol: Protocol = DEFAULT  # how latency is timed (a test may ask for an impossible tolerance)

    def __init__(self, config: JobConfig, data: ImageDataset, runtime: Runtime = CPU) -> None:
        self.config, self.data, self.runtime = config, data, runtime
        self.alone = replace(runtime, rank=0, world_size=1)  # rank 0's view when it works while the others wait
        self.example = data.example_input(1)
        self.first_step_done = False
        self.rows: list[dict[str, Any]] = []  # one per finished step, for the terminal table
        self.models: dict[str, nn.Module] = {}  # step -> the model it produced
        self.cpu_base: nn.Module | None = None  # the base a budget is measured against (Job.budget_base)
        self.metas: dict[str, dict[str, Any]] = {}  # step -> the meta its snapshot was saved with
        self.results: dict[str, dict[str, Any]] = {}  # step -> the figures its results JSON holds
        self.written: dict[str, list[Path]] = {"snapshots": [], "logs": [], "results": []}
        # a caller that already evaluated the base (the harness) sets it
        self.base_figures: dict[str, Any] | None = None
        self.timed = False  # figures carry batch-1 / batch-64 latency: the whole-pipeline table of a run that quantizes
        # the steps this run makes (run()); a caller driving steps one by one (the harness) asks for nothing else
        self.steps = ""
        self.snapshots: dict[str, tuple[str, str]] = {}  # stage -> (path, identity) of what this job saved or loaded
        self.chain: list[dict[str, Any]] = []  # the lineage of the last snapshot this job saved, itself last
        self.measurements = Measurements()  # latency by architecture: a model with another's widths reads its figures

    def run(self, steps: str) -> None:
        self.timed = "4" in steps
        self.steps = steps
        for step in steps:
            {"1": self.step_train, "2": self.step_prune, "3": self.step_refine, "4": self.step_quantize}[step]()

    def load(self, stage: str) -> tuple[nn.Module, dict[str, Any]]:
        """A snapshot this job builds on, refused when it is stale (made from an ancestor since replaced), made for
        other data, or not what this run asked for; its identity is remembered for what this job makes from it."""
        c = self.config
        root = c.save_root if self.first_step_done else c.load_root
        model, meta = load_model(root / stage, c.model, c.data_type)
        where = root / stage
        identity = lineage.snapshot_identity(where, (WEIGHTS_FILE, META_FILE))
        asked = {key: getattr(c, key) for key in c.asked}
        made_here = lambda made: lineage.STEP_OF_STAGE[made] in self.steps
        lineage.check(lineage.dataset_mismatch(where, meta, self.data.name, self.data.identity))
        lineage.check(lineage.stale_ancestor(where, meta, self.identity_now))
        lineage.check(lineage.unmet_request(where, meta, identity, asked, lambda made: not made_here(made)))
        if "lineage" not in meta and stage != STAGES["1"] and c.echo_epochs and self.runtime.is_main:
            print(
                f"note: {where} records no lineage (written before prunebench kept one); it is used unchecked",
                file=sys.stderr,
            )
        self.snapshots[stage] = (str(where.resolve()), identity)
        return model, meta

    def identity_now(self, ancestor: dict[str, Any]) -> str | None:
        """The identity of what lies where an ancestor lay: the snapshot this job saved or loaded there, else the one on
        disk (None: nothing there any more, so nothing to compare)."""
        path = Path(ancestor["path"])
        known = [identity for where, identity in self.snapshots.values() if where == str(path)]
        if known:
            return known[0]
        if (path / WEIGHTS_FILE).is_file() and (path / META_FILE).is_file():
            return lineage.snapshot_identity(path, (WEIGHTS_FILE, META_FILE))
        return None

    def meta(
        self, stage: str, settings: dict[str, Any], parent: dict[str, Any] | None = None, **extra: Any
    ) -> dict[str, Any]:
        """A snapshot's meta: what rebuilds it, the dataset, this run's settings for the step, and its lineage
        (`parent`: the meta of the snapshot it was made from, whose identity this job knows)."""
        c, d = self.config, self.data
        ancestry = lineage.descendant_lineage(parent, *reversed(self.snapshots[parent["stage"]])) if parent else []
        return {
            "model": c.model,
            "data_type": c.data_type,
            "input_shape": list(d.input_shape),
            "num_classes": d.num_classes,
            "mean": list(d.mean),
            "std": list(d.std),
            "stage": stage,
            "seed": c.seed,
            "dataset": {"name": d.name, "identity": d.identity},
            **extra,
            "settings": {"seed": c.seed, **settings},
            "lineage": ancestry,
        }

    def training_settings(self, step: str) -> dict[str, Any]:
        c = self.config
        return {
            "epochs": c.epochs(step),
            "batch_size": c.batch_size,
            "learning_rate": c.learning_rate,
            "optimizer": c.optimizer,
            "limit_batches": c.limit_batches,
        }

    def figures(self, model: nn.Module, result: EvalResult, runtime: Runtime | None = None) -> dict[str, Any]:
        """The results JSON's figures; `measured_on` says under which runtime (device, dtype, layout, processes)
        `result` was taken."""
        example = self.example_on(model)
        measured_on = (runtime or self.runtime).describe()
        payload = results_payload(
            result, model_size_mb(model), count_params(model), count_macs(model, example), measured_on=measured_on
        )
        return payload | self.latency(
            model
        )  # its reasoningTime: batch-64 throughput by the protocol, not one evaluation

    def example_on(self, model: nn.Module) -> torch.Tensor:
        """The one-image example on the model's device (an int8 model without parameters: the CPU)."""
        return self.example.to(next(model.parameters(), torch.empty(0)).device)

    def evaluate(self, model: nn.Module, runtime: Runtime | None = None) -> EvalResult:
        """Test-split figures; every process takes part unless a single-process `runtime` is given."""
        return evaluate(
            model, self.data, self.config.val_batch_size, self.config.limit_val_batches, runtime or self.runtime
        )

    def record(self, stage: str, figures: dict[str, Any]) -> None:
        if not self.runtime.is_main:  # the table is printed by rank 0
            return
        row = {
            "stage": stage,
            "params": figures["params"],
            "MACs": figures["macs"],
            "size MB": figures["modelSize"],
            "top-1": figures["accuracy"],
            f"top-{figures['top_k']}": figures["top_k_accuracy"],
            "samples/s": None if figures["reasoningTime"] is None else round(figures["reasoningTime"]),
        }
        timed = figures.get("latency", {})
        if self.timed and timed:
            _, other = TIMED_LAYOUTS  # the deployed layout first, then the one beside it
            row |= {f"b{batch} ms": timed[DEPLOYED_LAYOUT][f"b{batch}_ms"] for batch in LATENCY_BATCHES}
            row[f"b64 ms {LAYOUT_SUFFIXES[other].upper()}"] = timed[other]["b64_ms"]
        if timed:
            row["timing"] = "stable" if timed["stable"] else "unstable"
        self.rows.append(row)

    def latency(self, model: nn.Module) -> dict[str, Any]:
        """Rank 0's timing of `model` as deployed (BatchNorm folded; int8 models have it fused), by the stability
        protocol (pipeline.deploy.latency), on its device at one CPU thread, as the harness times: the batch-64
        throughput behind the table's samples/s always, and for a timed job (one that quantizes) batch 1 and 64 in both
        layouts, each with its 95% interval, runs and whether it settled. Identical architectures (a pruned and a
        refined model) read one measurement. {} where this process does not time (a harness cell, ranks but 0)."""
        if not (self.config.throughput and self.runtime.is_main):
            return {}
        example = self.example_on(model)
        threads = 1 if example.device.type == "cpu" else None
        batches, layouts = (LATENCY_BATCHES, TIMED_LAYOUTS) if self.timed else ((64,), (DEPLOYED_LAYOUT,))
        runnable = deployable(model)  # a copy: timing converts its layout
        timed = {
            batch: latency_by_layout(
                runnable,
                example_input=example,
                batch=batch,
                threads=threads,
                layouts=layouts,
                protocol=self.protocol,
                measurements=self.measurements,
            )
            for batch in batches
        }
        by_layout = {layout: {} for layout in layouts}
        for batch, measured in timed.items():
            for layout, measurement in measured.items():
                timing = measurement.timings[0]
                by_layout[layout] |= {
                    f"b{batch}_ms": round(timing.median * 1e3, 3),
                    f"b{batch}_interval_ms": [round(timing.low * 1e3, 3), round(timing.high * 1e3, 3)],
                    f"b{batch}_runs": timing.runs,
                    f"b{batch}_stable": timing.stable,
                }
        measurements = [m for measured in timed.values() for m in measured.values()]
        block = {
            "deployed_layout": DEPLOYED_LAYOUT,
            "layouts": {layout: LAYOUT_NAMES[layout] for layout in layouts},
            "device": str(example.device),
            "dtype": model_dtype(model, example.device),
            "threads": threads,
            "pinned_core": measurements[0].pinned,
            "stable": all(m.timings[0].stable for m in measurements),
            "form": f"eval, inference mode, BatchNorm folded; blocks until the 95% interval is within "
            f"+-{self.protocol.tolerance:.1%} (at most {self.protocol.cap_s:g} s); the median of every timed run",
            **by_layout,
        }
        return {"reasoningTime": round(64 / timed[64][DEPLOYED_LAYOUT].timings[0].median, 2), "latency": block}

    def save(self, step: str, model: nn.Module, meta: dict[str, Any], log_type: str, figures: dict[str, Any]) -> None:
        """Rank 0 writes (snapshots hold CPU tensors whatever the device); then everyone meets, so the files are
        complete for all. The results JSON carries the snapshot's lineage, itself last, and the seed of this run."""
        c, stage = self.config, STAGES[step]
        if self.runtime.is_main:
            directory = save_snapshot(c.save_root / stage, model, meta)
            self.written["snapshots"].append(directory)
            self.snapshots[stage] = (
                str(directory.resolve()),
                lineage.snapshot_identity(directory, (WEIGHTS_FILE, META_FILE)),
            )
            self.chain = lineage.descendant_lineage(meta, *reversed(self.snapshots[stage]))
            figures = {**figures, "seed": c.seed, "lineage": self.chain}
            self.written["results"].append(write_results(c.result_dir, c.model, c.data_type, log_type, figures))
        barrier(self.runtime)
        self.models[step], self.metas[step], self.results[step] = model, meta, figures
        self.first_step_done = True  # later steps load what this one saved

    def wait_for(self, step: str) -> dict[str, Any]:
        """A process other than rank 0, in a step rank 0 does alone: wait until it has saved, then take its model from
        disk (the int8 model of step 4 is the last thing a job makes: nothing after it needs it)."""
        barrier(self.runtime)
        self.first_step_done = True
        if step != "4":
            try:
                self.models[step], self.metas[step] = self.load(STAGES[step])
            except UsageError as error:
                raise ProcessError(
                    f"process {self.runtime.rank} cannot read the snapshot rank 0 wrote ({error}); on several "
                    "machines, --model_save_dir must be on a filesystem all of them share"
                ) from None
        return {}

    @contextlib.contextmanager
    def logged(self, step: str, log_type: str) -> Iterator[EpochLog | None]:
        """The step's epoch log (rank 0's), published only when the whole step is done, snapshot and results saved:
        Ctrl-C anywhere in the step leaves the previous log as it was."""
        if not self.runtime.is_main:
            yield None
            return
        c = self.config
        prefix = f"step {step} {STEP_NAMES[step]}:" if c.echo_epochs else None
        with epoch_log(c.log_dir, c.model, c.data_type, log_type, prefix) as log:
            yield log
        self.written["logs"].append(log.path)

    def fit(
        self,
        model: nn.Module,
        step: str,
        log: EpochLog | None,
        after_step: Callable[[nn.Module], None] | None = None,
        loss_fn: LossFunction = cross_entropy,
        epochs: int | None = None,
        runtime: Runtime | None = None,
    ) -> EvalResult:
        c, runtime = self.config, runtime or self.runtime
        epochs = c.epochs(step) if epochs is None else epochs
        history = train(
            model,
            self.data,
            epochs=epochs,
            batch_size=c.batch_size,
            val_batch_size=c.val_batch_size,
            lr=c.learning_rate,
            optimizer_name=c.optimizer,
            seed=c.seed,
            limit_batches=c.limit_batches,
            limit_val_batches=c.limit_val_batches,
            desc=STEP_NAMES[step],
            on_epoch=log,
            after_step=after_step,
            loss_fn=loss_fn,
            runtime=runtime,
        )
        return history[-1] if history else self.evaluate(model, runtime)

    def step_train(self) -> dict[str, Any]:
        c = self.config
        torch.manual_seed(c.seed)  # every process builds the same initial weights
        model = self.runtime.place(build_model(c.model, self.data.input_shape, self.data.num_classes))
        with self.logged("1", "base_model") as log:
            figures = self.figures(model, self.fit(model, "1", log))
            meta = self.meta(STAGES["1"], self.training_settings("1"), epochs=c.epochs("1"))
            self.save("1", model, meta, "base_model", figures)
        self.record("1 base", figures)
        stale = [STAGES[s] for s in "234" if s not in self.steps and (c.save_root / STAGES[s]).is_dir()]
        if stale and self.runtime.is_main and c.echo_epochs and self.steps:
            note = "were made from the previous base; later steps refuse them until --step 2 runs again"
            print(f"note: {', '.join(stale)} in {c.save_root} {note}", file=sys.stderr)
        return figures

    def step_prune(self) -> dict[str, Any]:
        """Pruning runs on rank 0, on the CPU (a one-off graph rewrite); the models it evaluates go to the job's
        device."""
        if not self.runtime.is_main:
            return self.wait_for("2")
        c, device = self.config, self.runtime.place
        base, base_meta = self.load(STAGES["1"])
        self.models.setdefault("1", base)
        self.cpu_base = copy.deepcopy(base).eval()  # stays on the CPU: `base` may be placed on the device below
        backend = get_backend(c.backend)
        method = c.method or backend.default_method(base)
        started = time.perf_counter()
        result = self.prune(base.eval(), method, round_index=1)
        seconds = time.perf_counter() - started
        blocked = result.info.get("why_unprunable", {})
        if blocked and c.echo_epochs:
            print(
                f"note: {len(blocked)} layer group(s) left unpruned: "
                + "; ".join(f"{k}: {v}" for k, v in blocked.items()),
                file=sys.stderr,
            )
        if not result.physical and c.echo_epochs:
            print(
                f"note: {method} is unstructured; the model is masked, not smaller: its size, MACs and latency are "
                "the dense model's",
                file=sys.stderr,
            )
        # data-driven NNI methods train while pruning: their masked model is their trained copy, masked (built while
        # base is on the CPU, as the masks are)
        trained_copy = result.info.get("masked_model")
        masked_model = device(trained_copy if trained_copy is not None else apply_masks(base, result.masks))
        pruned = device(result.model)
        # the base's figures: the harness's, or this job's step 1 (already evaluated and timed), or measured now
        base_figures = (
            self.base_figures
            or self.results.get("1")
            or self.figures(device(base), self.evaluate(base, self.alone), self.alone)
        )
        masked = self.evaluate(masked_model, self.alone)
        figures = self.figures(pruned, self.evaluate(pruned, self.alone), self.alone)
        info = {
            "backend": c.backend,
            "method": method,
            "percent": c.percent,
            "scope": result.scope,
            "exclude": list(c.exclude),
            "kept": result.kept,
            "physical": result.physical,
        }
        settings = {key: info[key] for key in ("backend", "method", "percent", "scope", "exclude")}
        settings["round_to"] = c.round_to
        budget = result.info.get("budget")
        if budget is not None:  # a budget, not a percent, decided the widths
            settings |= {"percent": None, "target": c.target, "allocation": c.allocation, "iterations": c.iterations}
            info["percent"] = None
        if "threshold" in result.info:  # the backend's criterion used it: it decided which channels go
            settings["threshold"] = result.info["threshold"]
        if result.info.get("train_steps"):
            settings["prune_steps"] = c.prune_steps
        removed_nothing = result.physical and all(row["after"] == row["before"] for row in result.kept_table())
        payload = {
            **figures,
            **info,
            "prune_seconds": round(seconds, 4),
            "prune_train_steps": result.info.get("train_steps", 0),
            "masked_accuracy": round(masked.top1, 6),
            "masked_top_k_accuracy": round(masked.top_k, 6),
            "base": base_figures,
            "layers": result.kept_table(),
            "why_unprunable": blocked,
            "settings": settings,
            "removed_nothing": removed_nothing,
            "threshold_ties": result.info.get("threshold_ties", []),
            "budget": budget,
        }
        self.save("2", pruned, self.meta(STAGES["2"], settings, base_meta, **info, budget=budget), "pruning", payload)
        if c.echo_epochs:
            print(
                f"pruned with {c.backend}/{method} ({result.scope} scope) in {seconds:.3f} s; masked model top-1 "
                f"{masked.top1:.4f}, physically pruned top-1 {figures['accuracy']:.4f}",
                file=sys.stderr,
            )
        if removed_nothing and c.echo_epochs:
            why = " (--percent 0)" if c.percent == 0 else f" (with --round_to {c.round_to})" if c.round_to else ""
            print(f"note: the prune removed no channel{why}; the pruned model is the base model", file=sys.stderr)
        if payload["threshold_ties"] and c.echo_epochs:
            ties = payload["threshold_ties"]
            print(
                f"note: threshold {settings['threshold']:g} gives every filter the same count in {len(ties)} layer "
                f"group(s) ({', '.join(ties)}): their channels went by index",
                file=sys.stderr,
            )
        if not self.rows:
            self.record("  base (loaded)", base_figures)
        if budget is not None and budget["reason"] and c.echo_epochs:
            print(
                f"note: {budget['target']} reached {budget['achieved_ratio']:g}x: {budget['reason']}", file=sys.stderr
            )
        threshold = f", threshold {settings['threshold']:g}" if "threshold" in settings else ""
        rounds = f", round 1 of {c.iterations}" if c.iterations > 1 else ""
        how = (
            f"{c.percent:g}" if budget is None else f"{c.target} {c.allocation}{rounds}: {budget['achieved_ratio']:g}x"
        )
        self.record(f"2 pruned ({method} {how}{threshold}{': removed nothing' if removed_nothing else ''})", figures)
        return payload

    def prune(self, model: nn.Module, method: str, round_index: int = 1) -> PruneResult:
        """One prune of `model`: at the config's percent, or to its budget (round `round_index` of `iterations`)."""
        c = self.config
        backend = get_backend(c.backend)
        context = prune_context(c, self.data)
        example = self.data.example_input(8)
        if c.target is None:
            return backend.prune(
                model,
                method,
                c.percent,
                example,
                scope=c.scope,
                exclude=list(c.exclude),
                seed=c.seed,
                **backend.options(context),
            )
        target = self.round_target(round_index)
        base = self.budget_base()
        path, identity = self.snapshots[STAGES["1"]]
        inputs = budget_inputs(
            c.allocation,
            target,
            base,
            model,
            self.data,
            Path(path).parent / BUDGET_CACHE,
            identity,
            self.measurements,
            self.runtime.device,
        )
        result = prune_to_budget(
            backend,
            model,
            method,
            target,
            example,
            allocation=c.allocation,
            exclude=c.exclude,
            seed=c.seed,
            context=context,
            **inputs,
        )
        if c.iterations > 1:  # the round's own ceiling stays beside the job's target, its ratio to the base beside
            record = result.info["budget"]
            record |= {
                "target": c.target,
                "round": round_index,
                "round_target": str(target),
                "base_ratio": round(self.base_cost(target) / record["achieved"], 4),
            }
        return result

    def round_already_met(self, model: nn.Module, round_index: int) -> dict[str, Any] | None:
        """The record of a round whose ceiling the model already meets (an earlier round pruned past it), else None."""
        target = self.round_target(round_index)
        now = self.cost_of(model, target)
        goal = target.goal(now)
        if now > goal:
            return None
        return {
            "target": self.config.target,
            "round": round_index,
            "round_target": str(target),
            "goal": goal,
            "achieved": now,
            "base_ratio": round(self.base_cost(target) / now, 4),
            "reason": f"round {round_index} pruned nothing: the model already met its ceiling {target}",
        }

    def budget_base(self) -> nn.Module:
        """The base model a budget is measured against (and scanned on), on the CPU where pruning runs: this job's
        snapshot of it, read once (also when a later round of iterative pruning runs in a job that did not make the
        base: --step 3)."""
        if self.cpu_base is None or STAGES["1"] not in self.snapshots:
            self.cpu_base = self.load(STAGES["1"])[0].eval()
        return self.cpu_base

    def round_target(self, round_index: int) -> Target:
        """The budget of round `round_index` of `iterations`: the same geometric share of the way each round, as an
        absolute ceiling on the base model's cost (later rounds prune a model already smaller)."""
        c = self.config
        target = parse_target(c.target)
        if c.iterations == 1:
            return target
        start = self.base_cost(target)
        goal = target.goal(start)
        return Target(target.cost, start * (goal / start) ** (round_index / c.iterations), relative=False)

    def base_cost(self, target: Target) -> float:
        return self.cost_of(self.budget_base(), target)

    def cost_of(self, model: nn.Module, target: Target) -> float:
        """A model's cost in the target's terms: counted, or timed by the protocol (read back once measured)."""
        example = self.data.example_input(1)
        return measured_cost(
            model, example, target.cost, latency_timer(target, example, self.measurements, self.runtime.device)
        )

    def step_refine(self) -> dict[str, Any]:
        c = self.config
        model, meta = self.load(STAGES["2"])
        model = self.runtime.place(model)
        loss: LossFunction = cross_entropy
        distilled: dict[str, Any] = {"distill": None}
        teacher = self.base_model() if c.distill else None
        if teacher is not None:
            loss = Distillation(teacher, c.kd_alpha, c.kd_temperature)
            distilled = {"distill": {"alpha": c.kd_alpha, "temperature": c.kd_temperature}}
        if teacher is not None and c.kd_features:
            layers = feature_layers(model, c.kd_features)
            torch.manual_seed(c.seed)  # the projections start the same whatever ran before in this process
            features = FeatureDistillation.build(
                teacher,
                model,
                layers,
                self.example.to(self.runtime.device),
                c.kd_alpha,
                c.kd_temperature,
                c.kd_feature_weight,
            )
            if self.runtime.distributed:
                broadcast_parameters(list(features.parameters()), self.runtime)
            loss = features
            distilled["distill"] |= {"features": layers, "feature_weight": c.kd_feature_weight}
        settings = {**self.training_settings("3"), "distill": c.distill}
        if c.distill:
            settings |= {
                "kd_alpha": c.kd_alpha,
                "kd_temperature": c.kd_temperature,
                "kd_features": c.kd_features,
                "kd_feature_weight": c.kd_feature_weight,
            }
        rounds: list[dict[str, Any]] = []  # iterative pruning: the budgets of rounds 2..k
        with self.logged("3", "prune_model") as log:
            keep = None if meta.get("physical", True) else keep_zeros(model)
            shares = round_epochs(c.epochs("3"), c.iterations if c.target else 1)
            for index, epochs in enumerate(shares, start=1):
                result = self.fit(model, "3", log, after_step=keep, loss_fn=loss, epochs=epochs)
                if index < len(shares):  # prune again, to this round's share of the budget, then fine-tune on
                    model = model.cpu().eval()  # pruning runs on the CPU
                    met = self.round_already_met(model, index + 1)
                    if met is not None:  # an earlier round went past this one's ceiling: nothing to prune
                        rounds.append(met)
                        model = self.runtime.place(model)
                        continue
                    again = self.prune(model, meta["method"], round_index=index + 1)
                    meta = {**meta, "kept": compose_kept(meta["kept"], again.kept)}
                    model = self.runtime.place(again.model)
                    rounds.append(again.info["budget"])
            figures = self.figures(model, result)
            if rounds:
                widths = {
                    name: module.weight.shape[0]
                    for name, module in self.budget_base().named_modules()
                    if isinstance(getattr(module, "weight", None), torch.Tensor)
                }
                figures["budget"] = {
                    "target": c.target,
                    "iterations": c.iterations,
                    "rounds": rounds,
                    "achieved_ratio": rounds[-1]["base_ratio"],
                    "ratios": {  # of the base's widths, after every round
                        layer: round(1 - len(kept) / widths[layer], 4)
                        for layer, kept in meta["kept"].items()
                        if layer in widths and len(kept) < widths[layer]
                    },
                }
            refined_meta = {**meta, **self.meta(STAGES["3"], settings, meta, refine_epochs=c.epochs("3"), **distilled)}
            self.save("3", model, refined_meta, "prune_model", {**figures, **distilled})
        label = " (KD + features)" if c.distill and c.kd_features else " (KD)" if c.distill else ""
        if rounds:
            label += f" ({c.iterations} rounds to {c.target}: {figures['budget']['achieved_ratio']:g}x)"
            if rounds[-1]["reason"] and c.echo_epochs:
                print(f"note: round {c.iterations} of {c.target}: {rounds[-1]['reason']}", file=sys.stderr)
        self.record("3 refined" + label, figures)
        return figures

    def base_model(self) -> nn.Module:
        """Step 1's model: the one this job trained or pruned from (the harness keeps it outside save_root), else its
        snapshot."""
        return self.runtime.place(self.models["1"] if "1" in self.models else self.load(STAGES["1"])[0])

    def quantization_source(self) -> tuple[str, nn.Module, dict[str, Any]]:
        """The model step 4 quantizes: the refined one if there is one, else the pruned one."""
        for step in ("3", "2"):
            if step in self.metas:  # saved by this job: model and meta are in memory
                return step, self.models[step], self.metas[step]
        root = self.config.save_root if self.first_step_done else self.config.load_root
        for step in ("3", "2"):
            if (root / STAGES[step]).is_dir():
                model, meta = self.load(STAGES[step])
                return step, model, meta
        raise UsageError(
            f"step 4 needs a pruned or refined model and {root} has neither; run --step 2 (and 3) first, or pass "
            "--model_load_dir"
        )

    def step_quantize(self) -> dict[str, Any]:
        """int8 kernels run on the CPU: rank 0 quantizes a CPU copy, in one process."""
        if not self.runtime.is_main:
            return self.wait_for("4")
        c = self.config
        step, model, meta = self.quantization_source()
        model = copy.deepcopy(model).cpu()
        on_cpu = replace(self.alone, device=torch.device("cpu"), amp="off", channels_last=False)
        if c.quantize in RETRAINING_QUANTIZERS and not meta.get("physical", True):
            raise UsageError(
                f"--quantize {c.quantize} would retrain the zeroed weights of {meta.get('method')} (masked, not "
                "smaller); use --quantize ptq"
            )
        if c.quantize in NNI_QUANTIZERS:
            return self.step_simulate_int8(step, model, meta, on_cpu)
        example = self.data.example_input(1)
        generator = torch.Generator().manual_seed(c.seed)
        with self.logged("4", "quant_model") if c.quantize == "qat" else contextlib.nullcontext() as log:
            if c.quantize == "ptq":
                batches = (images for images, _ in self.data.batches("train", c.batch_size, generator, c.calib_batches))
                quantized = quantize.post_training(model, batches, example)
            else:
                prepared = quantize.prepare(model, "qat", example)
                self.fit(prepared, "4", log, epochs=c.qat_epochs, runtime=on_cpu)
                quantized = quantize.convert(prepared, example)
            result = self.evaluate(quantized, on_cpu)
            figures = results_payload(
                result,
                model_size_mb(quantized),
                count_params(model),
                count_macs(model, example),
                measured_on=on_cpu.describe(),
                quantize=c.quantize,
                quantized_from=STAGES[step],
                float_size_mb=round(model_size_mb(model), 4),
            )
            figures |= self.latency(quantized)
            extra = {
                "quantize": c.quantize,
                "quantized_from": STAGES[step],
                "float_shapes": quantize.float_shapes(model),
            }
            quantized_meta = {**meta, **self.meta(STAGES["4"], self.quantize_settings(), meta, **extra)}
            self.save("4", quantized, quantized_meta, "quant_model", figures)
        self.record(f"4 int8 ({c.quantize})", figures)
        return figures

    def step_simulate_int8(self, step: str, model: nn.Module, meta: dict[str, Any], on_cpu: Runtime) -> dict[str, Any]:
        """Step 4 through NNI's quantizers: simulated int8, so the row has accuracy only; the snapshot keeps float
        weights + NNI's calibration."""
        c = self.config
        generator = torch.Generator().manual_seed(c.seed)
        limit = c.calib_batches if c.quantize == "nni-ptq" else c.limit_batches
        torch.manual_seed(c.seed)
        with self.logged("4", "quant_model") as log:
            float_model, calibration, result = fake_quantize(
                model,
                c.quantize,
                lambda: self.data.batches("train", c.batch_size, generator, limit),
                epochs=c.qat_epochs,
                make_optimizer=lambda params, wrap: make_optimizer(c.optimizer, params, c.learning_rate, wrap),
                measure=lambda simulated: self.evaluate(simulated, on_cpu),
                verbose=c.verbose,
            )
            log(max(c.qat_epochs - 1, 0) if c.quantize in NNI_RETRAINS else 0, result)
            figures = {
                **results_payload(
                    result,
                    model_size_mb(float_model),
                    count_params(float_model),
                    count_macs(float_model, self.example),
                    measured_on=on_cpu.describe(),
                ),
                "modelSize": None,
                "reasoningTime": None,
                "quantize": c.quantize,
                "quantized_from": STAGES[step],
                "simulated": True,
                "note": "NNI fake quantization: accuracy of simulated int8; no int8 kernel runs, so size and latency "
                "are not int8 figures and are left out",
            }
            extra = {"quantize": c.quantize, "simulated": True, "calibration": calibration}
            simulated_meta = {**meta, **self.meta(STAGES["4"], self.quantize_settings(), meta, **extra)}
            self.save("4", float_model, simulated_meta, "quant_model", figures)
        self.record(f"4 simulated int8 ({c.quantize}, accuracy only)", figures)  # no int8 kernel: nothing to time
        return figures

    def quantize_settings(self) -> dict[str, Any]:
        c = self.config
        settings: dict[str, Any] = {"quantize": c.quantize}
        if c.quantize in ("ptq", "nni-ptq"):
            settings["calib_batches"] = c.calib_batches
        if c.quantize in RETRAINING_QUANTIZERS:
            settings |= {"qat_epochs": c.qat_epochs, "learning_rate": c.learning_rate, "optimizer": c.optimizer}
        return settings

    def summary_lines(self) -> list[str]:
        """One line per kind of output: where this job wrote it; then the lineage of what it made last (one lineage a
        run)."""
        lines = [
            f"{kind} written to: {', '.join(str(p) for p in paths)}" for kind, paths in self.written.items() if paths
        ]
        if any(row.get("timing") == "unstable" for row in self.rows):
            lines.append(
                f"timing unstable: a latency figure's 95% interval stayed wider than +-{self.protocol.tolerance:.1%} "
                f"within {self.protocol.cap_s:g} s (other work on the machine, most likely): its samples/s and ms are "
                "rough"
            )
        if self.chain:
            lines.append(
                "lineage: "
                + " -> ".join(
                    f"{e['stage']} {e['identity'][:8]} ({lineage.describe(e['settings'])})" for e in self.chain
                )
            )
        return lines


def round_epochs(epochs: int, rounds: int) -> list[int]:
    """`epochs` of fine-tuning shared by `rounds` prune -> fine-tune rounds as evenly as they go (earlier rounds take
    the odd ones): the same total as one-shot pruning, so the comparison stays at equal training."""
    return [epochs // rounds + (1 if index < epochs % rounds else 0) for index in range(rounds)]


def compose_kept(earlier: dict[str, list[int]], later: dict[str, list[int]]) -> dict[str, list[int]]:
    """Kept channels in the original numbering after a second prune whose indices count the first's survivors."""
    return {layer: [kept[i] for i in later[layer]] if layer in later else kept for layer, kept in earlier.items()} | {
        layer: indices for layer, indices in later.items() if layer not in earlier
    }


def keep_zeros(model: nn.Module) -> Callable[[nn.Module], None]:
    """For a masked-only (unstructured) prune: pruned weights are the zeros; keep them zero while refining."""
    masks = {name: p.detach() != 0 for name, p in model.named_parameters() if name.endswith("weight") and p.ndim > 1}

    def reapply(trained: nn.Module) -> None:
        with torch.no_grad():
            for name, param in trained.named_parameters():
                if name in masks:
                    param.mul_(masks[name])

    return reapply
