"""The `nni` backend: Microsoft NNI 3.0 pruners and ModelSpeedup behind the common contract.

With backends/nni_quantize.py, the only modules that import `nni`. Workarounds from DESIGN.md section 6: NNI's own
tracer breaks on this torch, so ModelSpeedup gets `graph_module=torch.fx.symbolic_trace(model)`;
residual models get NNI's dependency groups (jit based, needs tensorboard) so masks agree.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.channel_pruning import check_round_to, check_scope, excluded_producers, validate_sparsity
from algorithms.criteria import group_score, unit_sum
from algorithms.errors import PruningError, first_line
from algorithms.graph import analyze
from algorithms.masks import apply_masks, mask_in_place, unit_masks
from algorithms.modules import clone_tree, has_norm, output_units
from algorithms.selection import round_up_kept

from .base import NO_JOB, JobContext, PruneResult, TrainBatches
from .runs import check_runs, output_shape

ONE_SHOT = {"l1": "L1NormPruner", "l2": "L2NormPruner", "fpgm": "FPGMPruner"}
DATA_DRIVEN = {"slim": "SlimPruner", "taylor": "TaylorPruner"}
SCHEDULED = {"agp": "AGPPruner", "linear": "LinearPruner"}
METHODS: tuple[str, ...] = ("level", *ONE_SHOT, *DATA_DRIVEN, *SCHEDULED)
TRAINS_WHILE_PRUNING = {*DATA_DRIVEN, *SCHEDULED}
SCHEDULE_BASES = ("l1", "taylor")


def import_nni() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NNI's own imports warn about torch APIs it uses
            import nni
            import nni.compression.pruning  # noqa: F401
            import nni.compression.speedup  # noqa: F401
    except Exception as error:  # ImportError, or NNI failing inside its own imports
        raise PruningError(
            f"the nni backend needs NNI 3.0 ({type(error).__name__}: {error}); run: pip install nni==3.0 tensorboard"
        ) from None
    return nni


@contextlib.contextmanager
def quiet_nni(verbose: bool) -> Iterator[None]:
    """NNI logs every replaced module in colour; keep that out of the terminal unless asked."""
    if verbose:
        yield
        return
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


class NNIBackend:
    name = "nni"
    methods: tuple[str, ...] = METHODS

    def default_method(self, model: nn.Module) -> str:
        return "l1"

    def default_methods(self, model: nn.Module) -> tuple[str, ...]:
        """The harness's default set: NNI's magnitude and geometric-median pruners, and slim where there is
        BatchNorm."""
        return ("l1", "fpgm", "slim") if has_norm(model) else ("l1", "fpgm")

    def physical(self, method: str) -> bool:
        return method != "level"

    def options(self, context: JobContext) -> dict[str, Any]:
        return {
            "train_batches": context.train_batches,
            "training_steps": context.training_steps,
            "learning_rate": context.learning_rate,
            "schedule_over": context.schedule_over,
            "verbose": context.verbose,
            "round_to": context.round_to,
        }

    def validate(
        self,
        model: nn.Module,
        method: str,
        sparsity: float | Mapping[str, float],
        scope: str | None = None,
        *,
        exclude: Iterable[str] = (),
        context: JobContext = NO_JOB,
        physical: bool | None = None,
    ) -> None:
        """The request errors prune() would raise, found before any training is spent (layer names are checked when
        the model is traced, in prune())."""
        has_data, schedule_over, round_to = context.train_batches is not None, context.schedule_over, context.round_to
        if method not in METHODS:
            raise PruningError(f"unknown NNI pruning method {method!r}; choose one of: {', '.join(METHODS)}")
        validate_sparsity(sparsity)
        check_round_to(round_to)
        if round_to and method == "level":
            raise PruningError("round_to rounds channel counts; level prunes single weights: leave round_to out")
        check_scope(scope, isinstance(sparsity, Mapping))
        if method == "level" and physical:  # None = the method's own default: level masks, the rest shrink
            raise PruningError(
                "level is unstructured (single weights): it cannot shrink the model physically; pass physical=False"
            )
        if method in SCHEDULED and schedule_over not in SCHEDULE_BASES:
            raise PruningError(f"{method} schedules one of {', '.join(SCHEDULE_BASES)}, not {schedule_over!r}")
        if method in TRAINS_WHILE_PRUNING and not has_data:
            raise PruningError(
                f"{method} is data-driven: pass train_batches (a function returning (images, labels) batches) and "
                "training_steps"
            )
        if method == "slim" and not has_norm(model):
            raise PruningError(
                f"slim ranks BatchNorm scales but {type(model).__name__} has no BatchNorm; use l1, l2 or fpgm"
            )
        import_nni()

    def prunable_layers(
        self, model: nn.Module, method: str, example_input: torch.Tensor, exclude: Iterable[str] = ()
    ) -> list[str]:
        graph = analyze(model, example_input)
        return _prunable(graph, excluded_producers(graph, {name for name, _ in model.named_modules()}, exclude))

    def kept_ratio(self, size: int, kept: int) -> float:
        return (size - kept + 0.5) / size  # NNI removes int(size x ratio) units

    def prune(
        self,
        model: nn.Module,
        method: str,
        sparsity: float | Mapping[str, float] | None,
        example_input: torch.Tensor,
        *,
        scope: str | None = None,
        exclude: Iterable[str] = (),
        seed: int = 0,
        config_list: list[dict[str, Any]] | None = None,
        physical: bool | None = None,
        train_batches: TrainBatches | None = None,
        training_steps: int = 50,
        learning_rate: float = 1e-3,
        schedule_over: str = "l1",
        schedule_times: int = 4,
        verbose: bool = False,
        round_to: int | None = None,
        **options: Any,
    ) -> PruneResult:
        """`round_to=N`: NNI's pruners have no such option, so their masks are rounded up afterwards: each pruned group
        keeps a multiple of N channels, the channels coming back being those with the largest L1 norm (the group stays
        whole when the rounded count reaches its size)."""
        if options:
            raise PruningError(f"the nni backend takes no option(s) {', '.join(sorted(options))}")
        physical = method != "level" if physical is None else physical
        context = JobContext(train_batches=train_batches, schedule_over=schedule_over, round_to=round_to)
        self.validate(
            model, method, sparsity if config_list is None else 0.0, scope, context=context, physical=physical
        )
        nni = import_nni()
        torch.manual_seed(seed)
        graph = analyze(model, example_input)
        modules = dict(model.named_modules())
        excluded = excluded_producers(graph, set(modules), exclude)
        prunable = _prunable(graph, excluded)
        working = clone_tree(model, {}).eval()
        expected_shape = output_shape(working, example_input)  # what the pruned model must still answer in
        coupled = any(len(graph.groups[graph.group_of_producer[p]].members) > 1 for p in prunable)
        if config_list is None:
            config_list = _config_list(method, sparsity, scope, prunable, graph.norm_after, modules)
        with quiet_nni(verbose):
            try:
                if coupled and method != "level":
                    config_list = _with_dependency_groups(
                        working, config_list, example_input, graph.norm_after if method == "slim" else None
                    )
                pruner = _make_pruner(
                    nni,
                    method,
                    working,
                    config_list,
                    train_batches,
                    training_steps,
                    learning_rate,
                    schedule_over,
                    schedule_times,
                )
                _, masks = pruner.compress(training_steps, None) if method in SCHEDULED else pruner.compress()
                pruner.unwrap_model()
            except PruningError:
                raise
            except Exception as error:  # NNI's own failures: say what NNI said, without its traceback
                raise PruningError(f"NNI {method} failed: {type(error).__name__}: {first_line(error)}") from None
            masks = {name: {k: v.detach().cpu() for k, v in m.items() if v is not None} for name, m in masks.items()}
            kept, units = _kept_from_masks(masks, graph.norm_after, modules)
            emptied = [name for name, indices in kept.items() if not indices]
            if emptied and method != "level":
                raise PruningError(
                    f"NNI {method} removed every unit of {', '.join(emptied)} (NNI 3.0 does not keep one unit per "
                    "layer in a global group); use scope='layer' or a lower sparsity"
                )
            if round_to:
                # the weights NNI scored (trained, for data-driven methods)
                kept = _rounded_up(kept, round_to, graph, dict(working.named_modules()))
                units = {name: count for name, count in units.items() if name in kept}
                masks = {name: unit_masks(modules[name], indices) for name, indices in kept.items()}
                if method == "slim":
                    masks |= {
                        graph.norm_after[n]: unit_masks(modules[graph.norm_after[n]], i)
                        for n, i in kept.items()
                        if n in graph.norm_after
                    }
            # NNI's speedup does not carry BatchNorm masks back to the conv: give it the conv masks too
            if method == "slim":
                masks = {**masks, **{name: unit_masks(modules[name], indices) for name, indices in kept.items()}}
            # unit_masks are broadcast views; NNI's speedup writes into the masks it is given
            if round_to or method == "slim":
                masks = {name: {key: mask.clone() for key, mask in layer.items()} for name, layer in masks.items()}
            trained = method in TRAINS_WHILE_PRUNING
            info: dict[str, Any] = {"train_steps": training_steps if trained else 0, "round_to": round_to}
            # NNI trained `working` while scoring: its masked figure must come from those weights, not the input model's
            if trained:
                info["masked_model"] = apply_masks(working, masks)
            if not physical:
                mask_in_place(working, masks)
                return PruneResult(
                    working,
                    kept if method != "level" else {},
                    masks,
                    units if method != "level" else {},
                    self.name,
                    method,
                    scope or "layer",
                    physical=False,
                    info={**info, "note": "masked only: size, MACs and latency are the dense model's"},
                )
            from nni.compression.speedup import ModelSpeedup

            try:
                device = next(
                    working.parameters()
                ).device  # the masks are kept on the CPU; the speedup applies them to the weights
                on_model = {
                    name: {key: mask.to(device) for key, mask in layer.items()} for name, layer in masks.items()
                }
                pruned = ModelSpeedup(
                    working, example_input, on_model, graph_module=torch.fx.symbolic_trace(working)
                ).speedup_model()
            except Exception as error:
                raise PruningError(
                    f"NNI ModelSpeedup failed after {method}: {type(error).__name__}: {str(error).strip()[:200]}"
                ) from None
        check_runs(pruned, example_input, f"NNI {method}", expected_shape)
        pruned_modules = dict(pruned.named_modules())
        for producer, indices in kept.items():
            if output_units(pruned_modules[producer]) != len(indices):
                raise PruningError(
                    f"NNI's speedup kept {output_units(pruned_modules[producer])} units of {producer}, its masks "
                    f"{len(indices)}: masks conflict"
                )
        pruned.train(model.training)
        return PruneResult(pruned, kept, masks, units, self.name, method, scope or "layer", info=info)


def _rounded_up(
    kept: dict[str, list[int]], multiple: int, graph: Any, modules: dict[str, nn.Module]
) -> dict[str, list[int]]:
    """Kept units per producer with every group's count rounded up to a multiple; coupled producers move together."""
    rounded: dict[str, list[int]] = {}
    for group_index in {graph.group_of_producer[name] for name in kept}:
        members = [name for name in graph.groups[group_index].members if name in kept]
        score = group_score(unit_sum, [modules[name].weight for name in members])
        indices = round_up_kept(score, torch.tensor(kept[members[0]]), multiple).tolist()
        if len(indices) < len(score):
            rounded |= dict.fromkeys(members, indices)
    return rounded


def _prunable(graph: Any, excluded: set[str]) -> list[str]:
    """NNI's pruners do not keep equal counts per block of a grouped conv, and its dependency groups and speedup do not
    follow channels through permutes, shuffles, chunks, LayerNorms or layer scales: such channels stay whole here."""
    return [
        p
        for p, g in graph.group_of_producer.items()
        if graph.groups[g].prunable
        and graph.groups[g].divisor == 1
        and not graph.groups[g].rearranged
        and p not in excluded
        and graph.groups[g].size > 1
    ]


def _config_list(
    method: str,
    sparsity: Any,
    scope: str | None,
    prunable: list[str],
    norm_after: dict[str, str],
    modules: dict[str, nn.Module],
) -> list[dict[str, Any]]:
    """Our options in NNI's words: sparse_ratio per layer, global_group_id for global scope."""

    def targets(names: list[str]) -> list[str]:
        return [norm_after[n] for n in names if n in norm_after] if method == "slim" else names

    if isinstance(sparsity, Mapping):
        for name in sparsity:
            if name not in prunable:
                raise PruningError(
                    f"per-layer sparsity names {name!r}, which is not a prunable Conv2d / hidden Linear of this model"
                )
        return [
            {"op_names": targets([name]), "sparse_ratio": float(ratio)}
            for name, ratio in sparsity.items()
            if targets([name])
        ]
    if scope == "global" and method != "level":  # one group; each layer may lose all but one unit
        sizes = {name: output_units(modules[name]) for name in prunable}
        return [
            {
                "op_names": targets([name]),
                "sparse_ratio": float(sparsity),
                "global_group_id": "all",
                "max_sparse_ratio": (sizes[name] - 1) / sizes[name],
            }
            for name in prunable
            if targets([name])
        ]
    config: dict[str, Any] = {"op_names": targets(prunable), "sparse_ratio": float(sparsity)}
    if method == "level":
        config["granularity"] = "default"
    if scope == "global":
        config["global_group_id"] = "all"
    return [config]


def _with_dependency_groups(
    model: nn.Module, config_list: list[dict[str, Any]], example_input: torch.Tensor, norm_after: dict[str, str] | None
) -> list[dict[str, Any]]:
    """NNI's dependency groups (residual-coupled layers share one id); for slim, moved onto each producer's
    BatchNorm."""
    from nni.compression.utils import auto_set_denpendency_group_ids

    if norm_after is None:
        return auto_set_denpendency_group_ids(model, config_list, example_input)
    producer_of = {norm: producer for producer, norm in norm_after.items()}
    as_producers = [{**c, "op_names": [producer_of[n] for n in c["op_names"]]} for c in config_list]
    grouped = auto_set_denpendency_group_ids(model, as_producers, example_input)
    return [{**c, "op_names": [norm_after[n] for n in c["op_names"]]} for c in grouped]


def _make_pruner(
    nni: Any,
    method: str,
    model: nn.Module,
    config_list: list[dict[str, Any]],
    train_batches: TrainBatches | None,
    steps: int,
    lr: float,
    schedule_over: str,
    times: int,
) -> Any:
    from nni.compression import pruning

    if method == "level":
        return pruning.LevelPruner(model, config_list)
    if method in ONE_SHOT:
        return getattr(pruning, ONE_SHOT[method])(model, config_list)
    evaluator = _evaluator(nni, model, train_batches, lr)
    if method == "slim":
        return pruning.SlimPruner(model, config_list, evaluator, training_steps=steps)
    if method == "taylor":
        return pruning.TaylorPruner(model, config_list, evaluator, training_steps=steps)
    interval = max(1, steps // times)
    # NNI asserts a scheduled Taylor pruner gathers its gradients within one interval
    base = (
        pruning.L1NormPruner(model, config_list)
        if schedule_over == "l1"
        else pruning.TaylorPruner(model, config_list, evaluator, training_steps=interval)
    )
    return getattr(pruning, SCHEDULED[method])(base, interval_steps=interval, total_times=times, evaluator=evaluator)


def _evaluator(nni: Any, model: nn.Module, train_batches: TrainBatches | None, lr: float) -> Any:
    return torch_evaluator(train_batches, nni.trace(torch.optim.Adam)(model.parameters(), lr=lr))


def torch_evaluator(
    train_batches: TrainBatches | None, optimizer: torch.optim.Optimizer, observe_only: bool = False
) -> Any:
    """NNI's TorchEvaluator over our batches, with cross-entropy steps. Pruners and QAT / LSQ quantizers train through
    it (NNI patches `optimizer`, which must come from nni.trace); `observe_only` feeds the batches in eval mode without
    gradients, which is all a post-training quantizer's observers need."""
    from nni.compression import TorchEvaluator

    def training_step(batch: tuple[torch.Tensor, torch.Tensor], model: nn.Module) -> torch.Tensor:
        images, labels = on_device(batch, model)
        return F.cross_entropy(model(images), labels)

    def training_func(
        model: nn.Module,
        optimizers: Any,
        training_step: Any,
        lr_schedulers: Any = None,
        max_steps: int | None = None,
        max_epochs: int | None = None,
    ) -> None:
        optimizer = optimizers[0] if isinstance(optimizers, list) else optimizers
        model.train(not observe_only)
        done, epochs = 0, 0
        while (max_steps is None or done < max_steps) and (max_epochs is None or epochs < max_epochs):
            for batch in train_batches():
                if observe_only:
                    with torch.no_grad():
                        model(on_device(batch, model)[0])
                else:
                    optimizer.zero_grad()
                    training_step(batch, model).backward()
                    optimizer.step()
                done += 1
                if max_steps is not None and done >= max_steps:
                    break
            epochs += 1
            if max_steps is None and max_epochs is None:
                break

    # NNI's post-training quantizer calls evaluate() once it has calibrated; the job takes its figures itself
    return TorchEvaluator(training_func, optimizer, training_step, evaluating_func=lambda _: None)


def on_device(batch: tuple[torch.Tensor, torch.Tensor], model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A (CPU) batch where the model is: the caller's batches do not know whether it lives on a GPU."""
    device = next(model.parameters()).device
    return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


def _kept_from_masks(
    masks: dict[str, dict[str, torch.Tensor]], norm_after: dict[str, str], modules: dict[str, nn.Module]
) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Kept output units per pruned producer, read off NNI's masks (BN masks count for their conv)."""
    producer_of = {norm: producer for producer, norm in norm_after.items()}
    kept: dict[str, list[int]] = {}
    units: dict[str, int] = {}
    for name, layer_masks in masks.items():
        weight = layer_masks.get("weight")
        if weight is None:
            continue
        alive = weight.reshape(weight.shape[0], -1).abs().sum(1) > 0
        producer = producer_of.get(name, name)
        if isinstance(modules.get(producer), (nn.Conv2d, nn.Linear)) and not bool(alive.all()):
            kept[producer] = alive.nonzero().flatten().tolist()
            units[producer] = int(weight.shape[0])
    return kept, units
