"""The job: 1 = train the base model, 2 = prune it, 3 = fine-tune ("refine") it.

run.py drives it from flags, the comparison harness once per cell; both through a JobConfig.
Each step writes a snapshot, a results JSON (and steps 1 and 3 a per-epoch log) and returns its figures.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from algorithms.masks import apply_masks
from backends import get_backend
from models import build_model

from .config import STAGES, JobConfig
from .data import ImageDataset
from .errors import UsageError
from .metrics import count_macs, count_params, model_size_mb
from .reporting import EpochLog, results_payload, write_results
from .snapshots import load_model, save_snapshot
from .training import EvalResult, evaluate, train

STEP_NAMES = {"1": "base", "2": "prune", "3": "refine"}


def check_request(config: JobConfig, data: ImageDataset, steps: str = "123") -> None:
    """Refuse an impossible request (model too big for the images, unknown method, ...) before any training."""
    try:
        with torch.device("meta"):  # structure only: no weights are initialised for the check
            probe = build_model(config.model, data.input_shape, data.num_classes)
    except ValueError as error:
        raise UsageError(f"{error} (dataset {config.data_type} has {data.input_shape} images)") from None
    if "2" in steps:
        backend = get_backend(config.backend)
        extra = {"round_to": config.round_to, "exclude": config.exclude} if config.backend == "tp" else {}
        backend.validate(probe, config.method or backend.default_method(probe), config.percent, config.scope, **extra)


class Job:
    """One train / prune / refine sequence over one dataset; remembers its models, figures and files."""

    def __init__(self, config: JobConfig, data: ImageDataset) -> None:
        self.config, self.data = config, data
        self.example = data.example_input(1)
        self.first_step_done = False
        self.rows: list[dict[str, Any]] = []  # one per finished step, for the terminal table
        self.models: dict[str, nn.Module] = {}  # step -> the model it produced
        self.written: dict[str, list[Path]] = {"snapshots": [], "logs": [], "results": []}
        self.base_figures: dict[str, Any] | None = None  # a caller that already evaluated the base (the harness) sets them

    def run(self, steps: str) -> None:
        for step in steps:
            {"1": self.step_train, "2": self.step_prune, "3": self.step_refine}[step]()

    def load(self, stage: str) -> tuple[nn.Module, dict[str, Any]]:
        root = self.config.save_root if self.first_step_done else self.config.load_root
        return load_model(root / stage, self.config.model, self.config.data_type)

    def meta(self, stage: str, **extra: Any) -> dict[str, Any]:
        c, d = self.config, self.data
        return {"model": c.model, "data_type": c.data_type, "input_shape": list(d.input_shape), "num_classes": d.num_classes,
                "mean": list(d.mean), "std": list(d.std), "stage": stage, "seed": c.seed, **extra}  # fmt: skip

    def figures(self, model: nn.Module, result: EvalResult) -> dict[str, Any]:
        return results_payload(result, model_size_mb(model), count_params(model), count_macs(model, self.example))

    def evaluate(self, model: nn.Module) -> EvalResult:
        return evaluate(model, self.data, self.config.val_batch_size, self.config.limit_val_batches)

    def record(self, stage: str, figures: dict[str, Any]) -> None:
        self.rows.append({"stage": stage, "params": figures["params"], "MACs": figures["macs"], "size MB": figures["modelSize"],
                          "top-1": figures["accuracy"], f"top-{figures['top_k']}": figures["top_k_accuracy"],
                          "samples/s": round(figures["reasoningTime"])})  # fmt: skip

    def save(self, step: str, model: nn.Module, meta: dict[str, Any], log_type: str, figures: dict[str, Any]) -> None:
        c = self.config
        self.written["snapshots"].append(save_snapshot(c.save_root / STAGES[step], model, meta))
        self.written["results"].append(write_results(c.result_dir, c.model, c.data_type, log_type, figures))
        self.models[step] = model
        self.first_step_done = True  # later steps load what this one saved

    def fit(self, model: nn.Module, step: str, log_type: str, after_step: Callable[[nn.Module], None] | None = None) -> EvalResult:
        c = self.config
        prefix = f"step {step} {STEP_NAMES[step]}:" if c.echo_epochs else None
        log = EpochLog(c.log_dir, c.model, c.data_type, log_type, terminal_prefix=prefix)
        self.written["logs"].append(log.path)
        history = train(model, self.data, epochs=c.epochs(step), batch_size=c.batch_size, val_batch_size=c.val_batch_size, lr=c.learning_rate,
                        optimizer_name=c.optimizer, seed=c.seed, limit_batches=c.limit_batches, limit_val_batches=c.limit_val_batches,
                        desc=STEP_NAMES[step], on_epoch=log, after_step=after_step)  # fmt: skip
        return history[-1] if history else self.evaluate(model)

    def step_train(self) -> dict[str, Any]:
        c = self.config
        torch.manual_seed(c.seed)
        model = build_model(c.model, self.data.input_shape, self.data.num_classes)
        figures = self.figures(model, self.fit(model, "1", "base_model"))
        self.save("1", model, self.meta(STAGES["1"], epochs=c.epochs("1")), "base_model", figures)
        self.record("1 base", figures)
        return figures

    def backend_options(self) -> dict[str, Any]:
        """What each backend needs beyond the common contract; the job's data feeds NNI's data-driven methods."""
        c = self.config
        if c.backend == "scratch":
            return {"threshold": c.threshold}
        generator = torch.Generator().manual_seed(c.seed)
        if c.backend == "tp":
            return {
                "train_batches": lambda: self.data.batches("train", c.batch_size, generator),
                "training_steps": c.prune_steps,
                "learning_rate": c.learning_rate,
                "round_to": c.round_to,
            }
        return {
            "train_batches": lambda: self.data.batches("train", c.batch_size, generator),
            "training_steps": c.prune_steps,
            "learning_rate": c.learning_rate,
            "schedule_over": c.schedule_over,
            "verbose": c.verbose,
        }

    def step_prune(self) -> dict[str, Any]:
        c = self.config
        base, _ = self.load(STAGES["1"])
        self.models.setdefault("1", base)
        backend = get_backend(c.backend)
        method = c.method or backend.default_method(base)
        started = time.perf_counter()
        result = backend.prune(base.eval(), method, c.percent, self.data.example_input(8), scope=c.scope, exclude=list(c.exclude), seed=c.seed,
                               **self.backend_options())  # fmt: skip
        seconds = time.perf_counter() - started
        blocked = result.info.get("why_unprunable", {})
        if blocked and c.echo_epochs:
            print(f"note: {len(blocked)} layer group(s) left unpruned: " + "; ".join(f"{k}: {v}" for k, v in blocked.items()), file=sys.stderr)
        if not result.physical and c.echo_epochs:
            print(f"note: {method} is unstructured; the model is masked, not smaller: its size, MACs and latency are the dense model's", file=sys.stderr)
        base_figures = self.base_figures or self.figures(base, self.evaluate(base))
        # data-driven NNI methods train while pruning: their masked model is their trained copy, masked
        trained_copy = result.info.get("masked_model")
        masked = self.evaluate(trained_copy if trained_copy is not None else apply_masks(base, result.masks))
        figures = self.figures(result.model, self.evaluate(result.model))
        info = {"backend": c.backend, "method": method, "percent": c.percent, "scope": result.scope, "exclude": list(c.exclude), "kept": result.kept,
                "physical": result.physical}  # fmt: skip
        payload = {**figures, **info, "prune_seconds": round(seconds, 4), "prune_train_steps": result.info.get("train_steps", 0),
                   "masked_accuracy": round(masked.top1, 6),
                   "masked_top_k_accuracy": round(masked.top_k, 6), "base": base_figures, "layers": result.kept_table(), "why_unprunable": blocked}  # fmt: skip
        self.save("2", result.model, self.meta(STAGES["2"], **info), "pruning", payload)
        if c.echo_epochs:
            print(f"pruned with {c.backend}/{method} ({result.scope} scope) in {seconds:.3f} s; "
                  f"masked model top-1 {masked.top1:.4f}, physically pruned top-1 {figures['accuracy']:.4f}", file=sys.stderr)  # fmt: skip
        if not self.rows:
            self.record("  base (loaded)", base_figures)
        self.record(f"2 pruned ({method} {c.percent:g})", figures)
        return payload

    def step_refine(self) -> dict[str, Any]:
        model, meta = self.load(STAGES["2"])
        result = self.fit(model, "3", "prune_model", after_step=None if meta.get("physical", True) else keep_zeros(model))
        figures = self.figures(model, result)
        self.save("3", model, {**meta, "stage": STAGES["3"], "refine_epochs": self.config.epochs("3")}, "prune_model", figures)
        self.record("3 refined", figures)
        return figures

    def summary_lines(self) -> list[str]:
        """One line per kind of output: where this job wrote it."""
        return [f"{kind} written to: {', '.join(str(p) for p in paths)}" for kind, paths in self.written.items() if paths]


def keep_zeros(model: nn.Module) -> Callable[[nn.Module], None]:
    """For a masked-only (unstructured) prune: pruned weights are the zeros; keep them zero while refining."""
    masks = {name: p.detach() != 0 for name, p in model.named_parameters() if name.endswith("weight") and p.ndim > 1}

    def reapply(trained: nn.Module) -> None:
        with torch.no_grad():
            for name, param in trained.named_parameters():
                if name in masks:
                    param.mul_(masks[name])

    return reapply
