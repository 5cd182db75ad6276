"""prunebench main job: 1 = train the base model, 2 = prune it, 3 = fine-tune ("refine") it.

python run.py --model vgg --data_type cifar10 --prune_method bn --percent 0.5 --step 123
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from algorithms.errors import PruningError
from algorithms.masks import apply_masks
from backends import BACKEND_NAMES, get_backend
from backends.nni_backend import SCHEDULE_BASES
from models import MODEL_NAMES, build_model
from pipeline.cli import OneLineParser
from pipeline.data import ImageDataset
from pipeline.datasets import BUILTIN_DATASETS, load_dataset
from pipeline.errors import UsageError
from pipeline.metrics import count_macs, count_params, model_size_mb
from pipeline.reporting import EpochLog, results_payload, write_results
from pipeline.snapshots import load_model, save_snapshot
from pipeline.training import OPTIMIZERS, EvalResult, evaluate, train

DEFAULT_EPOCHS = {"digits": 8}  # digits is small: more epochs, still about a minute; others: the original's 2
STAGES = {"1": "model_base", "2": "model_prune", "3": "model_refine"}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet", help=f"one of {', '.join(MODEL_NAMES)} (default lenet)")
    p.add_argument("--data_type", default="digits", help=f"{', '.join(BUILTIN_DATASETS)} or a custom dataset name (default digits)")
    p.add_argument("--prune_method", default=None, help="pruning method; default: bn for models with BatchNorm, neuron otherwise")
    p.add_argument("--percent", type=float, default=0.5, help="fraction of channels removed, in [0, 1) (default 0.5)")
    p.add_argument("--step", default="123", help="steps to run, in order: 1 train, 2 prune, 3 refine (default 123)")
    p.add_argument("--backend", default="scratch", help=f"pruning backend: {', '.join(BACKEND_NAMES)} (default scratch)")
    p.add_argument("--prune_scope", default="auto", choices=("auto", "global", "layer"), help="auto = the method's original scope")
    p.add_argument("--exclude", default="", help="comma-separated module names never pruned")
    p.add_argument("--threshold", type=float, default=0.06, help="weight threshold of conv_threshold (default 0.06)")
    p.add_argument("--prune_steps", type=int, default=50, help="training steps of data-driven NNI methods: slim, taylor, agp, linear (default 50)")
    p.add_argument("--schedule_over", default="l1", choices=SCHEDULE_BASES, help="what NNI's agp / linear schedules (default l1)")
    p.add_argument("--verbose", action="store_true", help="let NNI's own log lines through")
    p.add_argument("--num_epochs", type=int, default=None, help="epochs of steps 1 and 3 (default 8 on digits, else 2)")
    p.add_argument("--batch_size_per_device", type=int, default=32)
    p.add_argument("--val_batch_size_per_device", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--model_update", default="adam", choices=OPTIMIZERS, help="optimizer (default adam, as the original)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit_batches", type=int, default=None, help="train at most this many batches per epoch (quick runs)")
    p.add_argument("--limit_val_batches", type=int, default=None, help="evaluate at most this many test batches")
    p.add_argument("--data_dir", default="data", help="where torchvision datasets live (default ./data)")
    p.add_argument("--download", action="store_true", help="download mnist/cifar10/cifar100 into --data_dir if missing")
    p.add_argument("--dataset_dir", default=None, help="an OFRecord dataset directory for a custom --data_type (default ofData/<data_type>)")
    p.add_argument("--model_load_dir", default=None, help="snapshot root the first step loads from (default: --model_save_dir)")
    p.add_argument("--model_save_dir", default=None, help="snapshot root (default output/snapshots/<model>/<data_type>)")
    p.add_argument("--log_dir", default="log")
    p.add_argument("--result_dir", default="output/results")
    return p


def parse_steps(text: str) -> list[str]:
    if not text or any(c not in "123" for c in text) or list(text) != sorted(set(text)):
        raise UsageError(f"--step {text!r} must list steps 1, 2, 3 in increasing order without repeats, e.g. 123, 12, 23 or 3")
    return list(text)


def validate_args(args: argparse.Namespace) -> list[str]:
    steps = parse_steps(args.step)
    if args.model not in MODEL_NAMES:
        raise UsageError(f"unknown --model {args.model!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if args.backend not in BACKEND_NAMES:
        raise UsageError(f"unknown --backend {args.backend!r}; choose one of: {', '.join(BACKEND_NAMES)}")
    if not 0.0 <= args.percent < 1.0:
        raise UsageError(f"--percent {args.percent} is outside [0, 1): it is the fraction of channels removed")
    for flag in ("num_epochs", "batch_size_per_device", "val_batch_size_per_device", "limit_batches", "limit_val_batches", "prune_steps"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "num_epochs" else 1):
            raise UsageError(f"--{flag} must be {'non-negative' if flag == 'num_epochs' else 'positive'}, got {value}")
    if args.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be positive, got {args.learning_rate}")
    return steps


class Job:
    """One run.py invocation: the dataset, the directories, and a row per finished step."""

    def __init__(self, args: argparse.Namespace, data: ImageDataset) -> None:
        self.args, self.data = args, data
        default_root = Path("output/snapshots") / args.model / args.data_type
        self.save_root = Path(args.model_save_dir) if args.model_save_dir else default_root
        self.load_root = Path(args.model_load_dir) if args.model_load_dir else self.save_root
        self.first_step_done = False
        self.example = data.example_input(1)
        self.rows: list[dict[str, Any]] = []
        self.epochs = args.num_epochs if args.num_epochs is not None else DEFAULT_EPOCHS.get(args.data_type, 2)

    def load(self, stage: str) -> tuple[torch.nn.Module, dict[str, Any]]:
        root = self.save_root if self.first_step_done else self.load_root
        return load_model(root / stage, self.args.model, self.args.data_type)

    def meta(self, stage: str, **extra: Any) -> dict[str, Any]:
        a = self.args
        return {"model": a.model, "data_type": a.data_type, "input_shape": list(self.data.input_shape), "num_classes": self.data.num_classes,
                "mean": list(self.data.mean), "std": list(self.data.std), "stage": stage, "seed": a.seed, **extra}  # fmt: skip

    def figures(self, model: torch.nn.Module, result: EvalResult) -> dict[str, Any]:
        return results_payload(result, model_size_mb(model), count_params(model), count_macs(model, self.example))

    def record(self, stage: str, figures: dict[str, Any]) -> None:
        self.rows.append({"stage": stage, "params": figures["params"], "MACs": figures["macs"], "size MB": figures["modelSize"],
                          "top-1": figures["accuracy"], f"top-{figures['top_k']}": figures["top_k_accuracy"],
                          "samples/s": figures["reasoningTime"]})  # fmt: skip

    def fit(self, model: torch.nn.Module, log_type: str, desc: str, after_step: Any = None) -> EvalResult:
        a = self.args
        log = EpochLog(a.log_dir, a.model, a.data_type, log_type)
        history = train(model, self.data, epochs=self.epochs, batch_size=a.batch_size_per_device, val_batch_size=a.val_batch_size_per_device,
                        lr=a.learning_rate, optimizer_name=a.model_update, seed=a.seed, limit_batches=a.limit_batches,
                        limit_val_batches=a.limit_val_batches, desc=desc, on_epoch=log, after_step=after_step)  # fmt: skip
        return history[-1] if history else evaluate(model, self.data, a.val_batch_size_per_device, a.limit_val_batches)

    def step_train(self) -> None:
        a = self.args
        torch.manual_seed(a.seed)
        model = build_model(a.model, self.data.input_shape, self.data.num_classes)
        result = self.fit(model, "base_model", "base")
        figures = self.figures(model, result)
        save_snapshot(self.save_root / STAGES["1"], model, self.meta(STAGES["1"], epochs=self.epochs))
        write_results(a.result_dir, a.model, a.data_type, "base_model", figures)
        self.record("1 base", figures)

    def backend_options(self) -> dict[str, Any]:
        """What each backend needs beyond the common contract; run.py's data feeds NNI's data-driven methods."""
        a = self.args
        if a.backend == "scratch":
            return {"threshold": a.threshold}
        generator = torch.Generator().manual_seed(a.seed)
        return {
            "train_batches": lambda: self.data.batches("train", a.batch_size_per_device, generator),
            "training_steps": a.prune_steps,
            "learning_rate": a.learning_rate,
            "schedule_over": a.schedule_over,
            "verbose": a.verbose,
        }

    def step_prune(self) -> None:
        a = self.args
        base, _ = self.load(STAGES["1"])
        backend = get_backend(a.backend)
        method = a.prune_method or backend.default_method(base)
        scope = None if a.prune_scope == "auto" else a.prune_scope
        exclude = [name for name in a.exclude.split(",") if name]
        started = time.perf_counter()
        result = backend.prune(base.eval(), method, a.percent, self.data.example_input(8), scope=scope, exclude=exclude, seed=a.seed, **self.backend_options())
        seconds = time.perf_counter() - started
        if not result.physical:
            print(f"note: {method} is unstructured; the model is masked, not smaller: its size, MACs and latency are the dense model's", file=sys.stderr)
        base_figures = self.figures(base, evaluate(base, self.data, a.val_batch_size_per_device, a.limit_val_batches))
        masked = evaluate(apply_masks(base, result.masks), self.data, a.val_batch_size_per_device, a.limit_val_batches)
        figures = self.figures(result.model, evaluate(result.model, self.data, a.val_batch_size_per_device, a.limit_val_batches))
        info = {"backend": a.backend, "method": method, "percent": a.percent, "scope": result.scope, "exclude": exclude, "kept": result.kept,
                "physical": result.physical}  # fmt: skip
        save_snapshot(self.save_root / STAGES["2"], result.model, self.meta(STAGES["2"], **info))
        write_results(a.result_dir, a.model, a.data_type, "pruning", {
            **figures, **info, "prune_seconds": round(seconds, 4), "masked_accuracy": round(masked.top1, 6),
            "masked_top_k_accuracy": round(masked.top_k, 6), "base": base_figures, "layers": result.kept_table(),
        })  # fmt: skip
        print(f"pruned with {a.backend}/{method} ({result.scope} scope) in {seconds:.3f} s; "
              f"masked model top-1 {masked.top1:.4f}, physically pruned top-1 {figures['accuracy']:.4f}", file=sys.stderr)  # fmt: skip
        if not self.rows:
            self.record("  base (loaded)", base_figures)
        self.record(f"2 pruned ({method} {a.percent:g})", figures)

    def step_refine(self) -> None:
        a = self.args
        model, meta = self.load(STAGES["2"])
        result = self.fit(model, "prune_model", "refine", after_step=None if meta.get("physical", True) else keep_zeros(model))
        figures = self.figures(model, result)
        save_snapshot(self.save_root / STAGES["3"], model, {**meta, "stage": STAGES["3"], "refine_epochs": self.epochs})
        write_results(a.result_dir, a.model, a.data_type, "prune_model", figures)
        self.record("3 refined", figures)


def keep_zeros(model: torch.nn.Module) -> Any:
    """For a masked-only (unstructured) prune: pruned weights are the zeros; keep them zero while refining."""
    masks = {name: p.detach() != 0 for name, p in model.named_parameters() if name.endswith("weight") and p.ndim > 1}

    def reapply(trained: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, param in trained.named_parameters():
                if name in masks:
                    param.mul_(masks[name])

    return reapply


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        steps = validate_args(args)
        data = load_dataset(args.data_type, args.data_dir, args.download, dataset_dir=args.dataset_dir)
        try:
            with torch.device("meta"):  # structure only: the checks below need no initialised weights
                probe = build_model(args.model, data.input_shape, data.num_classes)
        except ValueError as error:
            raise UsageError(f"{error} (dataset {args.data_type} has {data.input_shape} images)") from None
        if "2" in steps:
            backend = get_backend(args.backend)
            backend.validate(probe, args.prune_method or backend.default_method(probe), args.percent, None if args.prune_scope == "auto" else args.prune_scope)
        job = Job(args, data)
        for step in steps:
            {"1": job.step_train, "2": job.step_prune, "3": job.step_refine}[step]()
            job.first_step_done = True
    except (UsageError, PruningError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; snapshots already written are complete, the step in progress wrote nothing", file=sys.stderr)
        return 130
    print(tabulate(job.rows, headers="keys", tablefmt="github", intfmt=",", floatfmt=".4f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
