"""prunebench main job: 1 = train the base model, 2 = prune it, 3 = fine-tune ("refine") it, 4 = quantize it to int8.

python run.py --model vgg --data_type cifar10 --prune_method bn --percent 0.5 --step 123
python run.py --model vgg --step 1234 --distill --quantize ptq
torchrun --nproc_per_node 2 run.py --model vgg --step 123     (steps 1 and 3 on two processes, DistributedDataParallel)
"""

from __future__ import annotations

import argparse
import signal
import sys

from tabulate import tabulate

from algorithms.errors import first_line
from backends import BACKEND_NAMES
from backends.budget import ALLOCATIONS, parse_target
from backends.nni_backend import SCHEDULE_BASES
from models import MODEL_NAMES
from pipeline.budgeting import check_timeable
from pipeline.cli import OneLineParser, check_positive, explicit_flags, guarded
from pipeline.config import JobConfig
from pipeline.data.datasets import BUILTIN_DATASETS, load_dataset
from pipeline.data.images import ImageDataset
from pipeline.errors import ProcessError, UsageError
from pipeline.job import Job, check_request
from pipeline.train.distributed import (
    JOIN_TIMEOUT_S,
    barrier,
    join,
    launched_by_torchrun,
    leave,
    peer_failed,
    torchrun_commands,
)
from pipeline.train.loop import OPTIMIZERS
from pipeline.train.runtime import AMP_DTYPES, Runtime, check_amp, resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet", help=f"one of {', '.join(MODEL_NAMES)} (default lenet)")
    p.add_argument(
        "--data_type", default="digits", help=f"{', '.join(BUILTIN_DATASETS)} or a custom dataset name (default digits)"
    )
    p.add_argument(
        "--prune_method", default=None, help="pruning method; default: bn for models with BatchNorm, neuron otherwise"
    )
    p.add_argument("--percent", type=float, default=0.5, help="fraction of channels removed, in [0, 1) (default 0.5)")
    p.add_argument(
        "--target",
        default=None,
        help="prune to a budget instead of a percent: macs=2x, params=4x, latency_b64=2x, latency_b1=1.5x (base / "
        "pruned), or a ceiling: macs=120M, latency_b64=30ms",
    )
    p.add_argument(
        "--allocation",
        default="uniform",
        choices=ALLOCATIONS,
        help="with --target, how the channels are shared among layers: uniform (one ratio), global (one LAMP "
        "threshold), sensitivity (a scan of the base), latency (a latency table) (default uniform)",
    )
    p.add_argument(
        "--iterations",
        type=int,
        default=1,
        help="with --target, reach it in this many prune -> fine-tune rounds (sharing the fine-tuning epochs)",
    )
    p.add_argument(
        "--step", default="123", help="steps to run, in order: 1 train, 2 prune, 3 refine, 4 int8 (default 123)"
    )
    p.add_argument(
        "--backend", default="scratch", help=f"pruning backend: {', '.join(BACKEND_NAMES)} (default scratch)"
    )
    p.add_argument(
        "--prune_scope", default="auto", choices=("auto", "global", "layer"), help="auto = the method's original scope"
    )
    p.add_argument("--exclude", default="", help="comma-separated module names never pruned")
    p.add_argument("--threshold", type=float, default=0.06, help="weight threshold of conv_threshold (default 0.06)")
    p.add_argument(
        "--prune_steps",
        type=int,
        default=50,
        help="training steps of data-driven methods: NNI slim, taylor, agp, linear; tp group_norm, group_slim, slim "
        "(default 50)",
    )
    p.add_argument(
        "--round_to",
        type=int,
        default=None,
        help="each pruned layer keeps a multiple of this many channels (e.g. 8 for GPU kernels)",
    )
    p.add_argument(
        "--schedule_over", default="l1", choices=SCHEDULE_BASES, help="what NNI's agp / linear schedules (default l1)"
    )
    p.add_argument("--verbose", action="store_true", help="let NNI's own log lines through")
    p.add_argument(
        "--distill", action="store_true", help="step 3 learns from the base model too (knowledge distillation)"
    )
    p.add_argument(
        "--kd_alpha",
        type=float,
        default=0.9,
        help="weight of the teacher's soft targets in the step-3 loss (default 0.9)",
    )
    p.add_argument(
        "--kd_temperature", type=float, default=4.0, help="softmax temperature of the distillation (default 4)"
    )
    p.add_argument(
        "--kd_features",
        nargs="?",
        const="auto",
        default=None,
        help="also match intermediate outputs (MSE through learned projections): auto (4 layers spread over depth) "
        "or comma-separated layer names",
    )
    p.add_argument(
        "--kd_feature_weight", type=float, default=1.0, help="weight of the feature term in the step-3 loss (default 1)"
    )
    p.add_argument(
        "--quantize",
        default="ptq",
        help="step 4: ptq (calibrate, convert) or qat (quantization-aware fine-tuning) to real int8 kernels; "
        "nni-ptq, nni-qat, nni-lsq: NNI's simulated int8, accuracy only (default ptq)",
    )
    p.add_argument("--calib_batches", type=int, default=8, help="training batches step 4 calibrates ptq on (default 8)")
    p.add_argument(
        "--qat_epochs", type=int, default=1, help="epochs of quantization-aware training for --quantize qat (default 1)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N (default auto)")
    p.add_argument(
        "--amp",
        default="off",
        choices=tuple(AMP_DTYPES),
        help="mixed precision for training and evaluation: bf16, fp16 (CUDA) (default off)",
    )
    p.add_argument(
        "--channels_last",
        action="store_true",
        help="NHWC memory format for models and batches (often faster, CPU and GPU)",
    )
    p.add_argument(
        "--workers", type=int, default=0, help="DataLoader worker processes (default 0: load in the training process)"
    )
    p.add_argument(
        "--sync_bn",
        action="store_true",
        help="under torchrun on CUDA: BatchNorm statistics over all processes' batches",
    )
    p.add_argument(
        "--join_timeout",
        type=float,
        default=JOIN_TIMEOUT_S,
        help=f"seconds to wait for the other processes (default {JOIN_TIMEOUT_S})",
    )
    p.add_argument(
        "--gpu_num_per_node",
        type=int,
        default=1,
        help="the original's flag: processes per machine; prints the torchrun command",
    )
    p.add_argument(
        "--num_nodes", type=int, default=1, help="the original's flag: machines; prints the torchrun command for each"
    )
    p.add_argument(
        "--node_ips", default="", help="the original's flag: comma-separated machine addresses, the first is the master"
    )
    p.add_argument("--num_epochs", type=int, default=None, help="epochs of steps 1 and 3 (default 8 on digits, else 2)")
    p.add_argument("--batch_size_per_device", type=int, default=32)
    p.add_argument("--val_batch_size_per_device", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument(
        "--model_update", default="adam", choices=OPTIMIZERS, help="optimizer (default adam, as the original)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--limit_batches", type=int, default=None, help="train at most this many batches per epoch (quick runs)"
    )
    p.add_argument("--limit_val_batches", type=int, default=None, help="evaluate at most this many test batches")
    p.add_argument("--data_dir", default="data", help="where torchvision datasets live (default ./data)")
    p.add_argument("--download", action="store_true", help="download mnist/cifar10/cifar100 into --data_dir if missing")
    p.add_argument(
        "--dataset_dir",
        default=None,
        help="an OFRecord dataset directory for a custom --data_type (default ofData/<data_type>)",
    )
    p.add_argument(
        "--model_load_dir", default=None, help="snapshot root the first step loads from (default: --model_save_dir)"
    )
    p.add_argument(
        "--model_save_dir", default=None, help="snapshot root (default output/snapshots/<model>/<data_type>)"
    )
    p.add_argument("--log_dir", default="log")
    p.add_argument("--result_dir", default="output/results")
    return p


def parse_steps(text: str) -> list[str]:
    if not text or any(c not in "1234" for c in text) or list(text) != sorted(set(text)):
        raise UsageError(
            f"--step {text!r} must list steps 1, 2, 3, 4 in increasing order without repeats, e.g. 123, 1234, 23 or 4"
        )
    return list(text)


def validate_args(args: argparse.Namespace) -> list[str]:
    steps = parse_steps(args.step)
    if args.model not in MODEL_NAMES:
        raise UsageError(f"unknown --model {args.model!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if args.backend not in BACKEND_NAMES:
        raise UsageError(f"unknown --backend {args.backend!r}; choose one of: {', '.join(BACKEND_NAMES)}")
    if not 0.0 <= args.percent < 1.0:
        raise UsageError(f"--percent {args.percent} is outside [0, 1): it is the fraction of channels removed")
    if args.workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {args.workers}")
    for flag in (
        "gpu_num_per_node",
        "num_nodes",
        "num_epochs",
        "batch_size_per_device",
        "val_batch_size_per_device",
        "limit_batches",
        "limit_val_batches",
        "prune_steps",
        "round_to",
    ):
        value = getattr(args, flag)
        # the launcher flags and batch sizes start at 1
        if value is not None and value < (0 if flag == "num_epochs" else 1):
            raise UsageError(f"--{flag} must be {'non-negative' if flag == 'num_epochs' else 'positive'}, got {value}")
    check_positive("learning_rate", args.learning_rate)
    return steps


FLAG_FIELDS = {"prune_method": "method", "prune_scope": "scope"}  # flags named otherwise in JobConfig


def config_from_args(args: argparse.Namespace, explicit: set[str] = frozenset()) -> JobConfig:
    """Flags -> the job's typed config (the original's flag names stay on the command line only); `explicit`: the flags
    given on the command line, which the job checks against the snapshots it builds on."""
    fields = set(JobConfig.__dataclass_fields__)
    asked = frozenset(FLAG_FIELDS.get(flag, flag) for flag in explicit if FLAG_FIELDS.get(flag, flag) in fields)
    return JobConfig(
        asked=asked,
        model=args.model,
        data_type=args.data_type,
        backend=args.backend,
        method=args.prune_method,
        percent=args.percent,
        target=args.target,
        allocation=args.allocation,
        iterations=args.iterations,
        scope=None if args.prune_scope == "auto" else args.prune_scope,
        exclude=tuple(name for name in args.exclude.split(",") if name),
        threshold=args.threshold,
        prune_steps=args.prune_steps,
        round_to=args.round_to,
        distill=args.distill,
        kd_alpha=args.kd_alpha,
        kd_temperature=args.kd_temperature,
        kd_features=args.kd_features,
        kd_feature_weight=args.kd_feature_weight,
        quantize=args.quantize,
        calib_batches=args.calib_batches,
        qat_epochs=args.qat_epochs,
        schedule_over=args.schedule_over,
        verbose=args.verbose,
        base_epochs=args.num_epochs,
        refine_epochs=args.num_epochs,
        batch_size=args.batch_size_per_device,
        val_batch_size=args.val_batch_size_per_device,
        learning_rate=args.learning_rate,
        optimizer=args.model_update,
        seed=args.seed,
        limit_batches=args.limit_batches,
        limit_val_batches=args.limit_val_batches,
        data_dir=args.data_dir,
        download=args.download,
        dataset_dir=args.dataset_dir,
        load_dir=args.model_load_dir,
        save_dir=args.model_save_dir,
        log_dir=args.log_dir,
        result_dir=args.result_dir,
    )


def runtime_from_args(args: argparse.Namespace) -> Runtime:
    """Device, precision and process group; under torchrun this process joins the others (bounded by --join_timeout)."""
    device = resolve_device(args.device)
    check_amp(args.amp, device)
    if args.sync_bn and device.type != "cuda":
        raise UsageError("--sync_bn needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs); leave it out on the CPU")
    check_positive("join_timeout", args.join_timeout)
    rank, world_size, group, wait_group = 0, 1, None, None
    if launched_by_torchrun():
        rank, world_size, device, group, wait_group = join(device, args.join_timeout)
        # torchrun stops the others when one process fails: unwind, so nothing is left half-written
        signal.signal(signal.SIGTERM, _stop)
    return Runtime(
        device=device,
        amp=args.amp,
        channels_last=args.channels_last,
        workers=args.workers,
        rank=rank,
        world_size=world_size,
        sync_bn=args.sync_bn,
        group=group,
        wait_group=wait_group,
    )


def load_data(config: JobConfig, runtime: Runtime) -> ImageDataset:
    """The dataset; with --download under torchrun, rank 0 fetches it first and the others read its files (never two
    downloads into one folder at once). Rank 0 releases the others even when it fails, and they then meet the same
    error."""

    def load(download: bool) -> ImageDataset:
        return load_dataset(config.data_type, config.data_dir, download, dataset_dir=config.dataset_dir)

    if not (runtime.distributed and config.download):
        return load(config.download)
    if not runtime.is_main:
        barrier(runtime)
        return load(False)
    try:
        return load(True)
    finally:
        barrier(runtime)


def _stop(_signal: int, _frame: object) -> None:
    """SIGTERM as Ctrl-C: `finally` blocks run, so a snapshot being staged is removed rather than left half-written."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    joined: list[Runtime] = []  # this process's runtime once it has joined a torchrun job
    own_error: list[bool] = []  # set when this process met a problem the others may not have (ProcessError)

    def run_job() -> int:
        steps = "".join(validate_args(args))
        processes = args.gpu_num_per_node * args.num_nodes
        if processes > 1 and not launched_by_torchrun():
            print("This run has several processes; start it with torchrun (PyTorch's launcher), on each machine:")
            print(
                "\n".join(
                    torchrun_commands(
                        args.gpu_num_per_node, args.num_nodes, [ip for ip in args.node_ips.split(",") if ip], argv
                    )
                )
            )
            return 0
        explicit = explicit_flags(build_parser(), argv)
        if args.target is not None and "percent" in explicit:
            raise UsageError("--target and --percent both say how much to prune; give one of them")
        if args.target is None and explicit & {"allocation", "iterations"}:
            raise UsageError("--allocation and --iterations shape a budget: add --target (e.g. --target macs=2x)")
        if args.target is not None:
            parse_target(args.target)  # a malformed target is refused before anything else
        config = config_from_args(args, explicit)
        runtime = runtime_from_args(args)
        joined.append(runtime)
        try:
            if processes > 1 and processes != runtime.world_size:
                raise UsageError(
                    f"--gpu_num_per_node x --num_nodes = {processes}, but torchrun started {runtime.world_size} "
                    "processes; make them agree"
                )
            if config.target is not None:
                check_timeable(parse_target(config.target), runtime.device, runtime.world_size, config.allocation)
            data = load_data(config, runtime)
            check_request(config, data, steps, runtime.device)
            job = Job(config, data, runtime)
            try:
                job.run(steps)
            except ProcessError:
                own_error.append(True)
                raise
            except RuntimeError as error:
                if not (runtime.distributed and peer_failed(error)):
                    raise
                raise SystemExit(
                    f"error: process {runtime.rank}: another process of this job failed or stopped "
                    f"({first_line(error)[:160]}); snapshots already written are complete"
                ) from None
            if runtime.is_main:
                print(tabulate(job.rows, headers="keys", tablefmt="github", intfmt=",", floatfmt=".4f"))
                print("\n".join(job.summary_lines()))
            return 0
        finally:
            leave()

    # once the processes have joined, bad input that every process meets is said once, by rank 0; a problem one process
    # alone meets (ProcessError) is said by that process, naming itself
    return guarded(
        run_job,
        "interrupted; snapshots already written are complete, the step in progress wrote nothing",
        quiet=lambda: bool(joined) and not joined[0].is_main and not own_error,
    )


if __name__ == "__main__":
    sys.exit(main())
