r"""python -m bench: run a comparison matrix; `merge` shards; `report` re-renders saved results.

python -m bench --models lenet,vgg --backends scratch,nni --percents 0.3,0.5,0.7 --data_type mnist5k \
                --out bench/results/mnist5k
python -m bench merge bench/results/shard0 bench/results/shard1 --out bench/results/all
python -m bench report bench/results/mnist5k
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backends import BACKEND_NAMES
from models import MODEL_NAMES
from pipeline.atomic import staged_directory
from pipeline.cli import OneLineParser, check_positive, explicit_flags, guarded
from pipeline.data.datasets import BUILTIN_DATASETS
from pipeline.deploy.latency import Measurement
from pipeline.errors import UsageError
from pipeline.train.loop import OPTIMIZERS
from pipeline.train.runtime import resolve_device

from . import store
from .cell import with_measurements
from .matrix import MatrixSpec, offered_methods, parse_shard
from .runner import render_all, run_matrix


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def _numbers(kind: type, flag: str):
    def parse(text: str) -> tuple:
        try:
            return tuple(dict.fromkeys(kind(part) for part in _names(text)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} takes comma-separated {kind.__name__} values, got {text!r}"
            ) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="-m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Methods: {offered_methods()}. Subcommands: merge DIR... --out DIR; report DIR.",
    )
    p.add_argument(
        "--models",
        type=_names,
        default=("lenet", "vgg"),
        help=f"comma-separated, from {', '.join(MODEL_NAMES)} (default lenet,vgg)",
    )
    p.add_argument(
        "--backends",
        type=_names,
        default=("scratch", "nni", "tp"),
        help=f"comma-separated, from {', '.join(BACKEND_NAMES)} (default scratch,nni,tp)",
    )
    p.add_argument(
        "--methods",
        type=_names,
        default=(),
        help="method names (every listed backend that offers one) or backend:method pairs; "
        "default: each backend's default set",
    )
    p.add_argument(
        "--percents",
        type=_numbers(float, "--percents"),
        default=(0.3, 0.5, 0.7),
        help="fractions of channels removed (default 0.3,0.5,0.7)",
    )
    p.add_argument(
        "--budgets",
        type=_budgets,
        default=(),
        help="compare at matched cost instead of percents: COST:VALUES, e.g. macs:2x,4x, params:4x, latency_b64:2x "
        "(base / pruned) or macs:120M",
    )
    p.add_argument(
        "--allocations",
        type=_names,
        default=("uniform",),
        help="with --budgets, an axis: uniform, global, sensitivity, latency (comma-separated; default uniform)",
    )
    p.add_argument(
        "--iterations", type=int, default=1, help="with --budgets: prune -> fine-tune rounds per budget (default 1)"
    )
    p.add_argument(
        "--thin_control",
        action="store_true",
        help="with --budgets: also train the model with every width scaled uniformly to each budget from scratch",
    )
    p.add_argument(
        "--seeds", type=_numbers(int, "--seeds"), default=(0,), help="seeds; each trains its own base model (default 0)"
    )
    p.add_argument(
        "--data_type", default="digits", help=f"{', '.join(BUILTIN_DATASETS)} or a custom dataset name (default digits)"
    )
    p.add_argument(
        "--base_epochs",
        type=int,
        default=None,
        help="epochs of each base model (default: run.py's, 8 on digits, else 2)",
    )
    p.add_argument(
        "--finetune_epochs", type=int, default=2, help="fine-tuning epochs of every pruned model (default 2)"
    )
    p.add_argument(
        "--scope", default="auto", choices=("auto", "global", "layer"), help="auto = each method's own scope"
    )
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--val_batch_size", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    p.add_argument(
        "--prune_steps", type=int, default=50, help="training steps of NNI's data-driven methods (default 50)"
    )
    p.add_argument(
        "--limit_batches", type=int, default=None, help="train at most this many batches per epoch (quick runs)"
    )
    p.add_argument("--limit_val_batches", type=int, default=None, help="evaluate at most this many test batches")
    p.add_argument(
        "--device",
        default="auto",
        help="where cells train and are timed: auto (CUDA when there is one), cpu, cuda or cuda:N (default auto)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads while timing latency (default 1: stable on a shared machine)",
    )
    p.add_argument(
        "--deployed_layout_only",
        action="store_true",
        help="time latency in channels_last only, without the NCHW columns beside it (halves the latency time, most "
        "of a vgg cell)",
    )
    p.add_argument(
        "--latency_tolerance",
        type=float,
        default=0.025,
        help="latency is timed in interleaved blocks until the 95%% interval of each figure is within +-this "
        "(default 0.025: two measurements then agree within 5%%)",
    )
    p.add_argument(
        "--latency_cap",
        type=float,
        default=30.0,
        help="seconds one latency measurement may take before its figure is marked unstable (default 30)",
    )
    p.add_argument(
        "--scratch_control",
        action="store_true",
        help="also train each pruned architecture from scratch for base + fine-tune epochs",
    )
    p.add_argument("--no_random_control", action="store_true", help="leave out the scratch:random control cells")
    p.add_argument(
        "--distill",
        type=_names,
        default=("off",),
        help="axis: off, on or off,on: refine with the base model as teacher (default off)",
    )
    p.add_argument(
        "--quantize",
        type=_names,
        default=("none",),
        help="axis: none, ptq, qat (real int8), nni-ptq, nni-qat, nni-lsq (NNI's simulated int8, accuracy only), "
        "comma-separated: add step 4 (default none)",
    )
    p.add_argument(
        "--shard",
        default="0/1",
        help="i/n: run the i-th of n deterministic slices (0-based), e.g. $SLURM_ARRAY_TASK_ID/8",
    )
    p.add_argument("--out", default=None, help="results directory (default bench/results/<data_type>)")
    p.add_argument(
        "--base_dir",
        default="output/bench_bases",
        help="cache of trained base models, shared across runs (default output/bench_bases)",
    )
    p.add_argument(
        "--keep_snapshots",
        action="store_true",
        help="keep each cell's pruned and fine-tuned snapshots under <out>/cells",
    )
    p.add_argument("--data_dir", default="data", help="where torchvision datasets live (default ./data)")
    p.add_argument("--download", action="store_true", help="download mnist/cifar10/cifar100 into --data_dir if missing")
    p.add_argument("--dataset_dir", default=None, help="an OFRecord dataset directory for a custom --data_type")
    return p


def spec_from_args(args: argparse.Namespace) -> MatrixSpec:
    for flag in (
        "base_epochs",
        "finetune_epochs",
        "batch_size",
        "val_batch_size",
        "prune_steps",
        "limit_batches",
        "limit_val_batches",
        "threads",
        "iterations",
    ):
        value = getattr(args, flag)
        least = 0 if flag.endswith("epochs") else 1
        if value is not None and value < least:
            raise UsageError(f"--{flag} must be {'non-negative' if least == 0 else 'positive'}, got {value}")
    check_positive("learning_rate", args.learning_rate)
    check_positive("latency_cap", args.latency_cap)
    if not 0 < args.latency_tolerance < 1:
        raise UsageError(
            f"--latency_tolerance must be a fraction in (0, 1), e.g. 0.05 for +-5%, got {args.latency_tolerance}"
        )
    return MatrixSpec(
        models=args.models,
        backends=args.backends,
        methods=args.methods,
        percents=args.percents,
        budgets=args.budgets,
        allocations=args.allocations,
        iterations=args.iterations,
        thin_control=args.thin_control,
        seeds=args.seeds,
        data_type=args.data_type,
        base_epochs=args.base_epochs,
        finetune_epochs=args.finetune_epochs,
        batch_size=args.batch_size,
        val_batch_size=args.val_batch_size,
        learning_rate=args.learning_rate,
        optimizer=args.optimizer,
        limit_batches=args.limit_batches,
        limit_val_batches=args.limit_val_batches,
        prune_steps=args.prune_steps,
        scope=None if args.scope == "auto" else args.scope,
        threads=args.threads,
        latency_tolerance=args.latency_tolerance,
        latency_cap_s=args.latency_cap,
        random_control=not args.no_random_control,
        scratch_control=args.scratch_control,
        distill=_switches(args.distill),
        quantize=args.quantize,
        device=str(resolve_device(args.device)),
        other_layouts=not args.deployed_layout_only,
    )


def _switches(values: tuple[str, ...]) -> tuple[bool, ...]:
    unknown = [v for v in values if v not in ("off", "on")]
    if unknown or not values:
        raise UsageError(f"--distill takes off, on or off,on, got {','.join(values)!r}")
    return tuple(v == "on" for v in values)


def _budgets(text: str) -> tuple[str, ...]:
    """ "macs:2x,4x" -> ("macs=2x", "macs=4x"): one cost, several values."""
    cost, colon, values = text.partition(":")
    if not colon or not values.strip():
        raise argparse.ArgumentTypeError(f"--budgets takes COST:VALUES such as macs:2x,4x, got {text!r}")
    return tuple(f"{cost.strip()}={value}" for value in _names(values))


def run_command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.budgets:
        if "percents" in explicit_flags(build_parser(), argv):
            raise UsageError("--budgets and --percents both say how much to prune; give one of them")
        args.percents = ()
    spec = spec_from_args(args)
    out = Path(args.out or f"bench/results/{spec.data_type}")
    rows = run_matrix(
        spec,
        out,
        base_root=Path(args.base_dir),
        shard_of=parse_shard(args.shard),
        keep_snapshots=args.keep_snapshots,
        data_options={"data_dir": args.data_dir, "download": args.download, "dataset_dir": args.dataset_dir},
    )
    failed = sum(row.get("status") != "ok" for row in rows)
    print(
        f"{len(rows)} cells in {out}/results.jsonl ({failed} failed); report: {out}/report.md; tables: "
        f"{out}/results.csv; plots: {out}/*.png"
    )
    if failed:  # a Slurm array or CI job must see it; the failed cells and their errors are in the report
        print(
            f"error: {failed} cell(s) failed; see the 'Failed cells' table in {out}/report.md, then rerun the same "
            "command to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def merge_command(argv: list[str]) -> int:
    p = OneLineParser(
        prog="-m bench merge", description="join the results directories of shards (or runs) of one matrix"
    )
    p.add_argument("dirs", nargs="+", help="results directories to join")
    p.add_argument("--out", required=True, help="new directory for the merged results")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(
            f"--out {out} exists and is not an empty directory; choose a new directory for the merged results"
        )
    manifest, rows = store.merge([Path(d) for d in args.dirs])
    latency = store.merge_latency([Path(d) for d in args.dirs])
    known = {entry["key"]: Measurement.from_json(entry["measurement"]) for entry in latency}
    rows = [with_measurements(row, known) for row in rows]
    with staged_directory(out) as staging:
        store.write_manifest(staging, manifest)
        store.write_rows(staging, rows)
        store.write_latency(staging, latency)
        render_all(staging, manifest, rows)
    print(f"merged {len(rows)} cells from {len(args.dirs)} directories into {out}")
    if manifest["missing_shards"]:
        print(
            f"warning: no directory holds shard(s) {', '.join(manifest['missing_shards'])}; the merged matrix is "
            "incomplete",
            file=sys.stderr,
        )
    return 0


def report_command(argv: list[str]) -> int:
    p = OneLineParser(
        prog="-m bench report", description="re-render results.csv, report.md and the plots from saved results"
    )
    p.add_argument("dir", help="a results directory written by python -m bench")
    directory = Path(p.parse_args(argv).dir)
    manifest = store.read_manifest(directory)
    if manifest is None:
        raise UsageError(f"{directory} is not a python -m bench results directory (no {store.MANIFEST})")
    # no run lock: the reports are written whole (temporary file, then rename), so a report of a run in progress is safe
    written = render_all(directory, manifest, store.read_rows(directory))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = {"merge": merge_command, "report": report_command}.get(argv[0] if argv else "", run_command)
    arguments = argv[1:] if command is not run_command else argv
    return guarded(
        lambda: command(arguments),
        "interrupted: every finished cell is saved in results.jsonl; run the same command again to resume",
    )
