"""The four comparison plots (PNG), one panel per model, drawn from the per-configuration summary."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.deploy.latency import T975  # noqa: E402

MARKERS = {"scratch": "o", "nni": "s", "tp": "^", "thin": "D"}


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """Configurations no other one beats on both fewer MACs and higher accuracy, sorted by MACs."""
    ordered = points.sort_values(["macs_after", "finetuned_top1"], ascending=[True, False])
    front, best = [], -1.0
    for index, row in ordered.iterrows():
        if row.finetuned_top1 > best:
            front.append(index)
            best = row.finetuned_top1
    return ordered.loc[front]


def _panels(models: list[str], title: str) -> tuple[plt.Figure, list[plt.Axes]]:
    figure, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.8), squeeze=False)
    figure.suptitle(title, fontsize=13)
    return figure, list(axes[0])


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    temp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temp, dpi=110)
    plt.close(figure)
    temp.replace(path)
    return path


def _label(row: pd.Series) -> str:
    return f"{row.backend}:{row.method}"


def _finish(ax: plt.Axes, **settings: object) -> None:
    ax.set(**settings)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def half_width(std: pd.Series, seeds: pd.Series) -> pd.Series:
    """The 95% Student's t half-width of a mean over seeds from its std (0 for one seed: no interval to draw)."""
    quantile = seeds.map(lambda n: T975[int(n) - 2] if 2 <= n < len(T975) + 2 else (1.96 if n >= 2 else 0.0))
    return (quantile * std.fillna(0.0) / seeds.clip(lower=1) ** 0.5).fillna(0.0)


def accuracy_vs_macs(stats: pd.DataFrame, path: Path) -> Path:
    """Fine-tuned top-1 against MACs per configuration: percent cells with their std over seeds, budget cells (one line
    per allocation) with their 95% interval, as the matched-budget table gives it."""
    models = sorted(stats.model.unique())
    figure, axes = _panels(models, "Fine-tuned accuracy vs cost (Pareto front dashed)")
    if "allocation" not in stats:
        stats = stats.assign(allocation="", budget="")
    for ax, model in zip(axes, models, strict=True):
        per = stats[stats.model == model]
        for (backend, method, allocation, distill), group in per.groupby(
            ["backend", "method", "allocation", "distill"], sort=True
        ):
            group = group.sort_values("macs_after")
            budgeted = bool(allocation)
            spread = group.get("finetuned_top1_std")
            ax.errorbar(
                group.macs_after / 1e6,
                group.finetuned_top1,
                yerr=half_width(spread, group.seeds) if budgeted and spread is not None else spread,
                marker=MARKERS.get(backend, "x"),
                linestyle="-" if not budgeted else "-." if allocation != "uniform" else "--",
                capsize=3,
                label=f"{backend}:{method}" + (f" {allocation}" if budgeted else "") + (" +KD" if distill else ""),
            )
        front = pareto_front(per)
        ax.plot(front.macs_after / 1e6, front.finetuned_top1, "k--", linewidth=1, label="Pareto front")
        base = per.iloc[0]
        ax.scatter(
            [base.macs_before / 1e6],
            [base.base_top1],
            marker="*",
            s=160,
            color="black",
            zorder=5,
            label="base (unpruned)",
        )
        _finish(ax, title=model, xlabel="MACs per sample (millions)", ylabel="top-1 accuracy after fine-tuning")
        low, high = ax.get_ylim()
        ax.set_ylim(max(low, 0.0), min(high, 1.01))  # an interval past what accuracy can be says nothing there
    return _save(figure, path)


def speedup_vs_macs(stats: pd.DataFrame, path: Path, layout: str) -> Path:
    """`layout`: the memory format the plotted speedups were timed in (the deployed one; NCHW sits in results.csv).
    A hollow marker is a speedup whose 95% interval stayed wider than the tolerance (unstable). Each axis is scaled to
    its points, the y = x line drawn across them (not the axes stretched to the line)."""
    timed = stats.dropna(subset=["speedup_b64"]) if "speedup_b64" in stats else stats.iloc[0:0].assign(speedup_b64=[])
    unstable = timed.get("speedup_b64_unstable", pd.Series(False, index=timed.index)).fillna(False).astype(bool)
    models = sorted(stats.model.unique())
    figure, axes = _panels(models, "Measured batch-64 latency speedup vs MAC reduction")
    for ax, model in zip(axes, models, strict=True):
        per = timed[timed.model == model]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        groups = per.groupby(["backend", "method", "distill"], sort=True)
        for index, ((backend, method, distill), group) in enumerate(groups):
            label, marker = f"{backend}:{method}" + (" +KD" if distill else ""), MARKERS.get(backend, "x")
            color = colors[index % len(colors)]
            settled, rough = group[~unstable[group.index]], group[unstable[group.index]]
            ax.scatter(settled.mac_ratio, settled.speedup_b64, marker=marker, color=color, label=label)
            ax.scatter(rough.mac_ratio, rough.speedup_b64, marker=marker, facecolors="none", edgecolors=color)
        if unstable[per.index].any():
            ax.scatter(
                [], [], marker="o", facecolors="none", edgecolors="gray", label="hollow: unstable (wide interval)"
            )
        if per.empty:
            ax.text(0.5, 0.5, "no physically pruned model to time", transform=ax.transAxes, ha="center")
            _finish(ax, title=f"{model}, timed in {layout}")
            continue
        x_low, x_top = _span([1.0, *per.mac_ratio])
        y_low, y_top = _span([1.0, *per.speedup_b64])  # a pruned model slower than dense stays in view
        ax.plot([x_low, x_top], [x_low, x_top], "k--", linewidth=1, label="y = x (speedup = MAC reduction)")
        _finish(
            ax,
            title=f"{model}, timed in {layout}",
            xlabel="MAC reduction (dense / pruned, x)",
            ylabel="latency speedup (dense / pruned time, x)",
            xlim=(x_low, x_top),
            ylim=(y_low, y_top),
        )
    return _save(figure, path)


def _span(values: list[float]) -> tuple[float, float]:
    """The values' range with a margin of a tenth of it on each side."""
    low, top = min(values), max(values)
    margin = 0.1 * (top - low or 1.0)
    return low - margin, top + margin


def kept_channels(ok_rows: pd.DataFrame, path: Path) -> Path:
    """Per-layer kept fraction of each method at the percent nearest 0.5 (first seed)."""
    models = sorted(ok_rows.model.unique())
    figure, axes = _panels(models, "Kept channels per layer")
    for ax, model in zip(axes, models, strict=True):
        per = ok_rows[(ok_rows.model == model) & ok_rows.kept_channels.notna()]
        if per.empty:
            continue
        budgets = sorted(b for b in per.get("budget", pd.Series(dtype=str)).fillna("").unique() if b)
        if budgets:  # a budget matrix: its first budget, one line per allocation
            per = per[per.budget == budgets[0]].sort_values("seed").drop_duplicates(["backend", "method", "allocation"])
            title = f"{model}, at {budgets[0]}"
        else:
            percent = min(per.percent.unique(), key=lambda p: (abs(p - 0.5), p))
            per = per[per.percent == percent].sort_values("seed").drop_duplicates(["backend", "method"])
            title = f"{model}, {percent:g} of channels removed"
        widths = [(row, json.loads(row.kept_channels), json.loads(row.units_json)) for _, row in per.iterrows()]
        rank = {
            name: position for _, row in per.iterrows() for name, position in json.loads(row.layer_rank_json).items()
        }
        # absent from a row = not pruned
        layers = sorted({name for _, _, units in widths for name in units}, key=lambda name: rank.get(name, 0))
        for row, kept, units in widths:
            ax.plot(
                range(len(layers)),
                [kept[n] / units[n] if n in kept else 1.0 for n in layers],
                marker=MARKERS.get(row.backend, "x"),
                label=_label(row) + (f" {row.allocation}" if budgets else ""),
            )
        ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
        _finish(
            ax,
            title=title,
            xlabel="pruned layer (network order)",
            ylabel="kept fraction of the layer's channels",
            ylim=(0, 1.05),
        )
    return _save(figure, path)


def masked_vs_pruned(stats: pd.DataFrame, path: Path) -> Path:
    models = sorted(stats.model.unique())
    figure, axes = _panels(models, "Masked vs physically pruned accuracy, before fine-tuning")
    for ax, model in zip(axes, models, strict=True):
        per = stats[stats.model == model]
        for backend, group in per.groupby("backend", sort=True):
            ax.scatter(group.masked_top1, group.pruned_top1, marker=MARKERS.get(backend, "x"), label=backend)
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="y = x (masked figure is what the smaller model does)")
        axis = {"xlim": (0, 1), "ylim": (0, 1)}
        _finish(
            ax,
            title=model,
            xlabel="masked model top-1 (weights x mask, BatchNorm untouched)",
            ylabel="physically pruned model top-1",
            **axis,
        )
    return _save(figure, path)


def draw_all(directory: Path, stats: pd.DataFrame, ok_rows: pd.DataFrame) -> list[Path]:
    if stats.empty:
        return []
    # int8 comes after the same fine-tuning: one point per fp32 configuration (the tables carry the int8 figures)
    config = ["model", "backend", "method", "scope", "percent", "budget", "allocation", "distill"]
    stats = stats.drop_duplicates(subset=[c for c in config if c in stats])
    return [
        accuracy_vs_macs(stats, directory / "accuracy_vs_macs.png"),
        speedup_vs_macs(
            stats, directory / "speedup_vs_macs.png", ", ".join(sorted(ok_rows["memory_format"].dropna().unique()))
        ),
        kept_channels(ok_rows, directory / "kept_channels.png"),
        masked_vs_pruned(stats, directory / "masked_vs_pruned.png"),
    ]
