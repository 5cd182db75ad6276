"""The job's settings as one typed record: run.py turns flags into it, the harness builds one per cell."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_EPOCHS = {"digits": 8}  # digits is small: more epochs, still about a minute; others: the original's 2
STAGES = {"1": "model_base", "2": "model_prune", "3": "model_refine", "4": "model_quant"}


@dataclass(frozen=True)
class JobConfig:
    """Everything that decides what train -> prune -> refine does and where it writes."""

    model: str = "lenet"
    data_type: str = "digits"
    backend: str = "scratch"
    method: str | None = None  # None: the backend's default for the model
    percent: float = 0.5
    target: str | None = None  # a budget instead of a percent: "macs=2x", "params=4x", "latency_b64=2x", "macs=120M"
    allocation: str = "uniform"  # how a budget's channels are shared among layers (backends.budget.ALLOCATIONS)
    iterations: int = 1  # reach the budget in this many prune -> fine-tune rounds (the same fine-tuning epochs in all)
    scope: str | None = None  # None: the method's own scope
    exclude: tuple[str, ...] = ()
    threshold: float = 0.06
    prune_steps: int = 50
    round_to: int | None = None  # tp backend: kept channel counts rounded to multiples of this
    distill: bool = False  # step 3 learns from the base model's logits too
    kd_alpha: float = 0.9
    kd_temperature: float = 4.0
    # None: logits only; "auto" or comma-separated layer names: also match those layers' outputs
    kd_features: str | None = None
    kd_feature_weight: float = 1.0
    quantize: str = "ptq"  # step 4: "ptq" (calibrate and convert) or "qat" (fake-quantised fine-tuning, then convert)
    calib_batches: int = 8
    qat_epochs: int = 1
    schedule_over: str = "l1"
    verbose: bool = False
    base_epochs: int | None = None  # None: DEFAULT_EPOCHS for the dataset, else 2
    refine_epochs: int | None = None
    batch_size: int = 32
    val_batch_size: int = 256
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    seed: int = 0
    limit_batches: int | None = None
    limit_val_batches: int | None = None
    data_dir: str = "data"
    download: bool = False
    dataset_dir: str | None = None
    load_dir: str | None = None  # where the first step loads from (default: save_dir)
    save_dir: str | None = None  # default output/snapshots/<model>/<data_type>
    log_dir: str = "log"
    result_dir: str = "output/results"
    echo_epochs: bool = True  # print each epoch line on the terminal too
    throughput: bool = True  # time each stage (samples/s); the harness times its cells itself
    # fields the user set explicitly (run.py): checked against the snapshots this run builds on
    asked: frozenset[str] = frozenset()

    @property
    def save_root(self) -> Path:
        return Path(self.save_dir) if self.save_dir else Path("output/snapshots") / self.model / self.data_type

    @property
    def load_root(self) -> Path:
        return Path(self.load_dir) if self.load_dir else self.save_root

    def epochs(self, step: str) -> int:
        chosen = self.base_epochs if step == "1" else self.refine_epochs
        return chosen if chosen is not None else DEFAULT_EPOCHS.get(self.data_type, 2)
