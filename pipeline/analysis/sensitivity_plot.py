"""The sensitivity figure: metric vs sparsity, one line per analysed unit, the unpruned metric dashed."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.atomic import write_bytes  # noqa: E402

TITLES = {
    "pruned": "physically pruned (BatchNorm sliced with the channels)",
    "masked": "masked, NNI's way (conv weights zeroed, BatchNorm untouched)",
}


def plot_sensitivity(
    results: Mapping[str, Mapping[str, Mapping[float, float]]], baseline: float, path: str | Path, title: str
) -> Path:
    """`results`: {mode: {unit: {sparsity: metric}}}; one panel per mode, sharing the y axis."""
    figure, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), sharey=True, squeeze=False)
    for axis, (mode, sensitivity) in zip(axes[0], results.items(), strict=True):
        # a distinct colour per unit up to 20,
        colors = list(plt.cm.tab20.colors if len(sensitivity) > 10 else plt.cm.tab10.colors)
        styles = ["-", "--", ":", "-."]  # then the colours again with another line style
        axis.set_prop_cycle(color=colors * len(styles), linestyle=[style for style in styles for _ in colors])
        for unit, values in sensitivity.items():
            points = sorted(values.items())
            label = unit if len(unit) <= 40 else unit[:37] + "..."
            axis.plot(
                [s for s, _ in points], [m for _, m in points], marker="o", markersize=3, linewidth=1.2, label=label
            )
        axis.axhline(baseline, color="black", linestyle="--", linewidth=1, label=f"unpruned ({baseline:.4f})")
        axis.set_xlabel("fraction of the unit's channels removed")
        axis.set_title(TITLES.get(mode, mode), fontsize=9)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("metric (top-1 accuracy)")
    axes[0][-1].legend(fontsize=6, loc="lower left", ncol=1 + len(next(iter(results.values()))) // 12)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    stream = io.BytesIO()
    figure.savefig(stream, format="png", dpi=120)
    plt.close(figure)
    return write_bytes(path, stream.getvalue())
