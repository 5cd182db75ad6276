r"""prunebench analysis tools: sensitivity, dependency, conflict, stats, export.

python analyze.py sensitivity --model vgg --data_type digits             # after run.py --model vgg --step 1
python analyze.py dependency --model resnet --out dependency.csv
python analyze.py conflict --model resnet --masks masks.pt --out fixed.pt
python analyze.py stats --snapshot output/snapshots/vgg/digits/model_base \
                        --compare output/snapshots/vgg/digits/model_prune
python analyze.py export --format onnx --snapshot output/snapshots/vgg/digits/model_prune --out vgg_pruned.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tabulate import tabulate

from algorithms.dependency import ChannelDependency, GroupDependency
from algorithms.mask_conflict import resolve_mask_conflict
from algorithms.sensitivity import EARLY_STOP_MODES, PRUNE_TYPES
from models import MODEL_NAMES, build_model
from pipeline.analysis.inputs import AnalysisModel, dataset_for, open_model, open_snapshot
from pipeline.analysis.layer_stats import side_by_side, stats_frame
from pipeline.analysis.sensitivity_job import SensitivityRequest, ratios_from_csv, run_sensitivity
from pipeline.analysis.sensitivity_job import check_request as check_sensitivity_request
from pipeline.atomic import write_text, write_torch
from pipeline.cli import OneLineParser, guarded
from pipeline.config import STAGES, JobConfig
from pipeline.data.datasets import BUILTIN_DATASETS
from pipeline.deploy.export import FORMATS, ExportMismatch, export
from pipeline.errors import UsageError

FRESH = "freshly initialised unless --snapshot"
TRAINED = "the base model run.py --step 1 trained for --data_type, unless --snapshot"


def _model_flags(p: argparse.ArgumentParser, which: str = FRESH) -> None:
    p.add_argument("--model", default=None, help=f"zoo model: {', '.join(MODEL_NAMES)} ({which})")
    p.add_argument(
        "--data_type", default="digits", help=f"{', '.join(BUILTIN_DATASETS)} or a custom dataset (default digits)"
    )
    p.add_argument(
        "--snapshot",
        default=None,
        help="a snapshot directory written by run.py (model_base, model_prune, model_refine)",
    )
    p.add_argument("--data_dir", default="data", help="where torchvision datasets live (default ./data)")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(" ", ",").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated fractions, e.g. 0.1,0.3,0.5") from None


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="analyze.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True, metavar="{sensitivity,dependency,conflict,stats,export}")

    s = commands.add_parser(
        "sensitivity", help="metric vs sparsity, one layer (or coupled set) at a time, on the physically pruned model"
    )
    _model_flags(s, TRAINED)
    s.add_argument("--prune_method", default="conv_all", help=f"ranking: {', '.join(PRUNE_TYPES)} (default conv_all)")
    s.add_argument(
        "--sparsities", type=_floats, default=None, help="comma-separated fractions in (0, 1) (default 0.1,...,0.9)"
    )
    s.add_argument(
        "--specified_layers", default=None, help="comma-separated layer names (default: every prunable layer or set)"
    )
    s.add_argument(
        "--early_stop_mode",
        default=None,
        choices=EARLY_STOP_MODES,
        help="stop a layer's scan: minimize/maximize/dropped/raised",
    )
    s.add_argument("--early_stop_value", type=float, default=None, help="the threshold of --early_stop_mode")
    s.add_argument(
        "--mode",
        default="pruned",
        choices=("pruned", "masked", "both"),
        help="pruned (default), masked as NNI did, or both side by side",
    )
    s.add_argument(
        "--threshold", type=float, default=0.06, help="weight magnitude conv_threshold counts above (default 0.06)"
    )
    s.add_argument(
        "--max_loss",
        type=float,
        default=None,
        help="also write per-layer ratios that keep the drop within this (get_ratios_by_loss)",
    )
    s.add_argument("--val_batch_size", type=int, default=256)
    s.add_argument(
        "--limit_val_batches", type=int, default=None, help="evaluate at most this many test batches per point"
    )
    s.add_argument("--outdir", default=None, help="default output/sensitivity/<model>/<data_type>")
    s.add_argument(
        "--from_csv",
        default=None,
        help="skip the scan: turn an existing sensitivity CSV into ratios (needs --max_loss)",
    )
    s.add_argument(
        "--baseline",
        type=float,
        default=None,
        help="with --from_csv: the unpruned metric (default: from sensitivity.json beside it)",
    )

    d = commands.add_parser(
        "dependency", help="channel dependency sets (NNI's ChannelDependency) and group constraints (GroupDependency)"
    )
    _model_flags(d)
    d.add_argument("--out", default=None, help="write the sets as NNI's CSV (Dependency Set,Convolutional Layers)")
    d.add_argument(
        "--groups_out", default=None, help="write the group constraints as NNI's CSV (Conv Layer Name,Group)"
    )

    c = commands.add_parser("conflict", help="fix channel masks so coupled layers agree (NNI's fix_mask_conflict)")
    _model_flags(c)
    c.add_argument("--masks", required=True, help="a torch.save'd {layer: {'weight': mask, 'bias': mask}} file")
    c.add_argument("--out", required=True, help="where to write the fixed masks")

    t = commands.add_parser("stats", help="per-layer shapes, MACs and parameters; two snapshots side by side")
    _model_flags(t)
    t.add_argument("--compare", default=None, help="a second snapshot (e.g. model_prune) shown beside the first")
    t.add_argument("--csv", default=None, help="also write the table as CSV")

    e = commands.add_parser("export", help="ONNX / TorchScript / masks, verified against PyTorch on a real batch")
    _model_flags(e)
    e.add_argument("--format", required=True, choices=FORMATS)
    e.add_argument("--out", required=True, help="the file to write")
    e.add_argument("--batch", type=int, default=16, help="test images the outputs are compared on (default 16)")
    return p


def _open(args: argparse.Namespace) -> AnalysisModel:
    return open_model(args.snapshot, args.model, args.data_type, args.command, args.data_dir)


def _positive(args: argparse.Namespace, *flags: str) -> None:
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be positive, got {value}")


def cmd_ratios(args: argparse.Namespace) -> int:
    if args.max_loss is None:
        raise UsageError("--from_csv needs --max_loss (the allowed drop of the metric)")
    ratios, baseline, path = ratios_from_csv(args.from_csv, args.max_loss, args.baseline, args.outdir)
    print(f"largest ratios within a loss of {args.max_loss:g} from {baseline:.4f}:")
    print(tabulate(ratios.items(), headers=["layer", "ratio"], tablefmt="github"))
    print(f"written to: {path}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    if args.from_csv is not None:
        return cmd_ratios(args)
    if args.baseline is not None:
        raise UsageError("--baseline goes with --from_csv (a scan measures the baseline itself)")
    _positive(args, "val_batch_size", "limit_val_batches")
    if args.snapshot is None and args.model is None:
        raise UsageError("pass --snapshot <dir> or --model <name> (whose base snapshot run.py --step 1 wrote)")
    snapshot = args.snapshot or str(JobConfig(model=args.model, data_type=args.data_type).save_root / STAGES["1"])
    layers = tuple(name for name in (args.specified_layers or "").split(",") if name) or None
    request = SensitivityRequest(
        prune_method=args.prune_method,
        sparsities=args.sparsities,
        specified_layers=layers,
        early_stop_mode=args.early_stop_mode,
        early_stop_value=args.early_stop_value,
        mode=args.mode,
        max_loss=args.max_loss,
        threshold=args.threshold,
        batch_size=args.val_batch_size,
        limit_val_batches=args.limit_val_batches,
        data_dir=args.data_dir,
    )
    check_sensitivity_request(request)
    loaded = open_snapshot(snapshot, args.model, "sensitivity")
    if loaded.meta["data_type"] != args.data_type and args.snapshot is None:
        raise UsageError(f"snapshot {snapshot} was trained on {loaded.meta['data_type']!r}, not {args.data_type!r}")
    outdir = args.outdir or str(Path("output/sensitivity") / loaded.meta["model"] / loaded.meta["data_type"])
    outcome = run_sensitivity(loaded, request, outdir)
    for mode, sensitivity in outcome.results.items():
        rows = [
            {"unit": unit, **{f"{s:g}": round(m, 4) for s, m in values.items()}} for unit, values in sensitivity.items()
        ]
        print(f"{mode} model, top-1 (unpruned {outcome.baseline:.4f}):")
        print(tabulate(rows, headers="keys", tablefmt="github"))
    for unit, reason in outcome.skipped.items():
        print(f"not analysed: {unit}: {reason}")
    if outcome.ratios is not None:
        print(
            f"largest ratios within a loss of {args.max_loss:g} from {outcome.baseline:.4f} (the 'ratios' of "
            "sensitivity.json):"
        )
        print(tabulate(outcome.ratios.items(), headers=["layer", "ratio"], tablefmt="github"))
    print("written to: " + ", ".join(str(p) for p in outcome.written))
    return 0


def cmd_dependency(args: argparse.Namespace) -> int:
    loaded = _open(args)
    example = loaded.example_input()
    channels = ChannelDependency(loaded.model, example)
    groups = GroupDependency(loaded.model, example, channels.graph)
    rows = [
        {
            "set": f"Set {n}",
            "channels": d.channels,
            "prunable": "yes" if d.prunable else f"no: {d.blocked_by[0]}",
            "layers": ", ".join(d.layers),
        }
        for n, d in enumerate(channels.sets, start=1)
    ]
    print(tabulate(rows, headers="keys", tablefmt="github"))
    constrained = {name: g for name, g in groups.dependency.items() if g > 1}
    print(
        "group constraints (filters must stay divisible into): "
        + (", ".join(f"{n}: {g}" for n, g in constrained.items()) or "none")
    )
    written = []
    if args.out:
        written.append(channels.export(args.out))
    if args.groups_out:
        written.append(groups.export(args.groups_out))
    if written:
        print("written to: " + ", ".join(str(p) for p in written))
    return 0


def cmd_conflict(args: argparse.Namespace) -> int:
    loaded = _open(args)
    fix = resolve_mask_conflict(args.masks, loaded.model, loaded.example_input())
    rows = [
        {
            "layers": ", ".join(s.layers),
            "channels": s.channels,
            "asked": ", ".join(f"{n}: {k}" for n, k in s.asked.items()),
            "pruned": s.pruned,
            "groups": s.groups,
            "note": f"cannot be pruned physically: {s.blocked_by[0]}"
            if s.blocked_by
            else ("fixed" if s.changed else ""),
        }
        for s in fix.sets
    ]
    print(tabulate(rows, headers="keys", tablefmt="github"))
    print(f"written to: {write_torch(args.out, fix.masks)}")
    return 0


def _stats_table(loaded: AnalysisModel) -> tuple[object, dict[str, float]]:
    return stats_frame(loaded.model, loaded.example_input())


def cmd_stats(args: argparse.Namespace) -> int:
    loaded = _open(args)
    frame, totals = _stats_table(loaded)
    if args.compare:
        other = open_snapshot(args.compare, command="stats --compare")
        if other.meta["model"] != loaded.meta["model"]:
            raise UsageError(
                f"--compare {args.compare} is of model {other.meta['model']!r}, not {loaded.meta['model']!r}"
            )
        other_frame, other_totals = _stats_table(other)
        frame = side_by_side(frame, other_frame)
        totals = {
            f"{key} {tag}": value
            for tag, figures in (("base", totals), ("pruned", other_totals))
            for key, value in figures.items()
        }
    print(
        f"{loaded.label}"
        + (f" vs {args.compare}" if args.compare else "")
        + f" ({loaded.meta['model']}, input {loaded.input_shape}):"
    )
    print(tabulate(frame, headers="keys", tablefmt="github", showindex=False, intfmt=",", missingval=""))
    print(
        "totals: "
        + ", ".join(f"{key} {value:,}" if isinstance(value, int) else f"{key} {value}" for key, value in totals.items())
    )
    if args.csv:
        print(f"written to: {write_text(args.csv, frame.to_csv(index=False))}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _positive(args, "batch")
    if args.snapshot is None:
        raise UsageError("export needs --snapshot <dir> (a model trained by run.py)")
    loaded = open_snapshot(
        args.snapshot, args.model, None if args.format in ("torchscript", "masks") else f"export --format {args.format}"
    )
    if args.format == "masks":
        original = build_model(loaded.meta["model"], loaded.input_shape, int(loaded.meta["num_classes"]))
        check = export(loaded.model, "masks", args.out, original=original, kept=loaded.kept)
    else:
        data = dataset_for(loaded, args.data_dir)
        batch = data.normalize(data.test_images[: args.batch])
        check = export(loaded.model, args.format, args.out, batch=batch)
        print(
            f"outputs match PyTorch on {check.batch} test images: max abs error {check.max_abs_error:.3g} (tolerance "
            "1e-4)"
        )
    print(f"{check.format}: {check.detail}")
    print(f"written to: {check.path}")
    return 0


COMMANDS = {
    "sensitivity": cmd_sensitivity,
    "dependency": cmd_dependency,
    "conflict": cmd_conflict,
    "stats": cmd_stats,
    "export": cmd_export,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        try:
            return COMMANDS[args.command](args)
        except ExportMismatch as error:
            print(f"error: {error}", file=sys.stderr)
            return 1

    return guarded(run, "interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
