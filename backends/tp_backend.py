"""The `tp` backend: Torch-Pruning 1.6 (DepGraph) importance criteria and pruners behind the common contract.

The only module that imports `torch_pruning`. Torch-Pruning prunes in place, so it works on a copy; the channels it
removes are read off the groups it prunes (its interactive step), so `kept` and `masks` say exactly what it cut. The
prunable set is the other backends': every Conv2d and hidden Linear as a root (Torch-Pruning's default would add
ConvTranspose, Conv1d and LSTM); layers whose outputs reach the model output through no other layer (the classifier) and
`exclude` go to `ignored_layers`. Our fx analysis finds those, and resolves a coupled group's per-layer ratios as
scratch does (the largest); everything else is Torch-Pruning's own DepGraph.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.channel_pruning import check_round_to, check_scope, excluded_producers, validate_sparsity
from algorithms.errors import PruningError, first_line
from algorithms.graph import analyze
from algorithms.masks import apply_masks, unit_masks
from algorithms.modules import clone_tree, has_norm, output_units
from algorithms.tracing import attributes_kept

from .base import NO_JOB, JobContext, PruneResult, TrainBatches
from .runs import check_runs, output_shape


@dataclass(frozen=True)
class Method:
    importance: str  # class in torch_pruning.importance
    arguments: tuple[tuple[str, Any], ...] = ()
    pruner: str = "BasePruner"  # class in torch_pruning.pruner
    pruner_arguments: tuple[tuple[str, Any], ...] = ()
    gradients: str | None = None  # "batch": summed loss gradients (Taylor), "sample": per-sample gradients (Hessian)
    sparse_training: bool = False  # trains `training_steps` with the pruner's regulariser before pruning
    needs_norm: bool = False

    @property
    def data_driven(self) -> bool:
        return self.gradients is not None or self.sparse_training


METHODS: dict[str, Method] = {
    "l1": Method("MagnitudeImportance", (("p", 1),)),
    "l2": Method("MagnitudeImportance", (("p", 2),)),
    "bn": Method("BNScaleImportance", needs_norm=True),
    "lamp": Method("LAMPImportance", (("p", 2),)),
    "random": Method("RandomImportance"),
    "taylor": Method("TaylorImportance", gradients="batch"),
    "hessian": Method("HessianImportance", gradients="sample"),
    "group_norm": Method("GroupMagnitudeImportance", (("p", 2),), pruner="GroupNormPruner", sparse_training=True),
    # network slimming: L1 on BN scales
    "slim": Method("BNScaleImportance", pruner="BNScalePruner", sparse_training=True, needs_norm=True),
    "group_slim": Method(
        "BNScaleImportance",
        pruner="BNScalePruner",
        pruner_arguments=(("group_lasso", True),),
        sparse_training=True,
        needs_norm=True,
    ),
}


def _import_tp() -> Any:
    try:
        import torch_pruning
    except Exception as error:
        raise PruningError(
            f"the tp backend needs Torch-Pruning ({type(error).__name__}: {error}); run: pip install "
            "torch-pruning==1.6.1"
        ) from None
    return torch_pruning


class TorchPruningBackend:
    name = "tp"
    methods: tuple[str, ...] = tuple(METHODS)

    def default_method(self, model: nn.Module) -> str:
        return "l1"

    def default_methods(self, model: nn.Module) -> tuple[str, ...]:
        """The harness's default set: Torch-Pruning's magnitude criterion and LAMP, and its BatchNorm scale where there
        is BatchNorm."""
        return ("l1", "lamp", "bn") if has_norm(model) else ("l1", "lamp")

    def physical(self, method: str) -> bool:
        return True

    def options(self, context: JobContext) -> dict[str, Any]:
        return {
            "train_batches": context.train_batches,
            "training_steps": context.training_steps,
            "learning_rate": context.learning_rate,
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
    ) -> None:
        """The request errors prune() would raise, found before any training is spent."""
        has_data, round_to = context.train_batches is not None, context.round_to
        if method not in METHODS:
            raise PruningError(f"Torch-Pruning offers no method {method!r} here; choose one of: {', '.join(METHODS)}")
        validate_sparsity(sparsity)
        check_scope(scope, isinstance(sparsity, Mapping))
        spec = METHODS[method]
        if spec.needs_norm and not has_norm(model):
            raise PruningError(
                f"{method} ranks BatchNorm scales but {type(model).__name__} has no BatchNorm; use l1, l2 or lamp"
            )
        if spec.data_driven and not has_data:
            raise PruningError(
                f"{method} is data-driven: pass train_batches (a function returning (images, labels) batches)"
            )
        if method == "group_slim":
            _check_norms_follow(model)
        check_round_to(round_to)
        # the last: the classifier
        layers = [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))][:-1]
        _check_round_to(
            round_to,
            [n for n in layers if not any(n == e or n.startswith(e + ".") for e in exclude)],
            dict(model.named_modules()),
        )
        _import_tp()

    def prunable_layers(
        self, model: nn.Module, method: str, example_input: torch.Tensor, exclude: Iterable[str] = ()
    ) -> list[str]:
        graph = analyze(model, example_input.clone())
        return _prunable(graph, excluded_producers(graph, {name for name, _ in model.named_modules()}, exclude))

    def kept_ratio(self, size: int, kept: int) -> float:
        return max(0.0, (size - kept - 0.5) / size)  # Torch-Pruning keeps int(size x (1 - ratio)) units

    def prune(
        self,
        model: nn.Module,
        method: str,
        sparsity: float | Mapping[str, float],
        example_input: torch.Tensor,
        *,
        scope: str | None = None,
        exclude: Iterable[str] = (),
        seed: int = 0,
        round_to: int | None = None,
        train_batches: TrainBatches | None = None,
        training_steps: int = 50,
        importance_batches: int = 4,
        learning_rate: float = 1e-3,
        **options: Any,
    ) -> PruneResult:
        if options:
            raise PruningError(f"the tp backend takes no option(s) {', '.join(sorted(options))}")
        self.validate(model, method, sparsity, scope, context=JobContext(train_batches=train_batches))
        check_round_to(round_to)
        if training_steps < 0 or importance_batches < 1:
            raise PruningError(
                f"training_steps must be >= 0 and importance_batches >= 1, got {training_steps} and "
                f"{importance_batches}"
            )
        example_input = example_input.clone()  # a model may change its input in place: never the caller's
        tp = _import_tp()
        spec = METHODS[method]
        per_layer = isinstance(sparsity, Mapping)
        scope = "layer" if per_layer or scope is None else scope
        graph = analyze(model, example_input)
        originals = dict(model.named_modules())
        excluded = excluded_producers(graph, set(originals), exclude)
        classifier = set(graph.output_producers)
        working = clone_tree(model, {})
        modules = dict(working.named_modules())
        prunable = _prunable(graph, excluded)
        _check_round_to(round_to, prunable, originals)
        if scope == "layer":
            _check_nothing_emptied(sparsity, round_to, prunable, originals, graph)
        ratio_dict = _ratio_dict(sparsity, prunable, modules, graph) if per_layer else None
        if method == "group_slim":
            _check_every_group_has_a_norm(graph, prunable)
        expected_shape = output_shape(working, example_input)  # the caller's model is never run
        trainable = {name: p.requires_grad for name, p in working.named_parameters()}
        modes = {name: m.training for name, m in model.named_modules()}
        for (
            parameter
        ) in working.parameters():  # Torch-Pruning traces through autograd: frozen layers would be invisible to it
            parameter.requires_grad_(True)

        torch.manual_seed(seed)
        importance = getattr(tp.importance, spec.importance)(**dict(spec.arguments))
        ignored = [modules[name] for name in sorted(classifier | excluded)]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Torch-Pruning warns about every layer it cannot see through
                with attributes_kept(working):  # its forward on the example: what that caches is of the dense model
                    pruner = getattr(tp.pruner, spec.pruner)(
                        working,
                        example_input,
                        importance=importance,
                        global_pruning=scope == "global",
                        pruning_ratio=0.0 if per_layer else float(sparsity),
                        pruning_ratio_dict=ratio_dict,
                        ignored_layers=ignored,
                        round_to=round_to,
                        root_module_types=[nn.Conv2d, nn.Linear],
                        **dict(spec.pruner_arguments),
                    )
                steps, trained = 0, None
                if spec.sparse_training:
                    steps = _sparse_train(
                        working, pruner, _batches(train_batches, example_input.device), training_steps, learning_rate
                    )
                    # the weights Torch-Pruning then pruned: the masked figure comes from these
                    trained = clone_tree(working, {})
                elif spec.gradients:
                    _gradients(
                        working,
                        importance,
                        _batches(train_batches, example_input.device),
                        importance_batches,
                        per_sample=spec.gradients == "sample",
                    )
                removed = _prune(tp, pruner, {module: name for name, module in modules.items()})
        except PruningError:
            raise
        except Exception as error:
            # Torch-Pruning's own failures (e.g. ZeroDivisionError on a channel shuffle): one line
            raise PruningError(
                f"Torch-Pruning {method} failed on {type(model).__name__}: {type(error).__name__}: "
                f"{first_line(error)[:200]}"
            ) from None
        working.zero_grad(set_to_none=True)
        for name, parameter in working.named_parameters():
            parameter.requires_grad_(trainable.get(name, True))
        check_runs(working, example_input, f"Torch-Pruning {method}", expected_shape)
        kept = {
            name: sorted(set(range(output_units(originals[name]))) - set(indices))
            for name, indices in removed.items()
            if indices
        }
        # shapes only: the same for a trained copy
        masks = {name: unit_masks(originals[name], indices) for name, indices in kept.items()}
        units = {name: output_units(originals[name]) for name in kept}
        for name, module in working.named_modules():
            module.__dict__["training"] = modes.get(name, model.training)
        info: dict[str, Any] = {"train_steps": steps, "round_to": round_to}
        if trained is not None:
            info["masked_model"] = apply_masks(trained, masks)
        return PruneResult(working, kept, masks, units, self.name, method, scope, info=info)


def _check_round_to(round_to: int | None, prunable: list[str], modules: dict[str, nn.Module]) -> None:
    narrow = [name for name in prunable if round_to is not None and output_units(modules[name]) < round_to]
    if narrow:
        name = narrow[0]
        raise PruningError(
            f"round_to={round_to} is larger than {name} ({output_units(modules[name])} units); use a round_to of at "
            "most that, or exclude it"
        )


def _check_norms_follow(model: nn.Module) -> None:
    """group_slim before any training: every Conv2d / Linear but the last (the classifier) registered right before a
    BatchNorm."""
    named = list(model.named_modules())
    layers = [i for i, (_, module) in enumerate(named) if isinstance(module, (nn.Conv2d, nn.Linear))][:-1]
    bare = [
        named[i][0]
        for i in layers
        if i + 1 >= len(named) or not isinstance(named[i + 1][1], nn.modules.batchnorm._BatchNorm)
    ]
    if bare:
        raise PruningError(
            f"group_slim needs a BatchNorm after every pruned layer, and {bare[0]} has none; use slim, or exclude "
            f"{', '.join(bare)}"
        )


def _prunable(graph: Any, excluded: set[str]) -> list[str]:
    """Every Conv2d / Linear Torch-Pruning may cut: all but the classifier, what the caller excluded, and an attention
    qkv (its units are heads, which only scratch prunes: a channel ratio of qkv breaks the reshape into heads)."""
    return [
        p
        for p in graph.group_of_producer
        if p not in set(graph.output_producers) | excluded and graph.group(p).heads is None
    ]


def _check_nothing_emptied(
    sparsity: float | Mapping[str, float],
    round_to: int | None,
    prunable: list[str],
    modules: dict[str, nn.Module],
    graph: Any,
) -> None:
    """Torch-Pruning keeps floor(n * (1 - ratio)) channels, rounded down to round_to, and silently skips a layer that
    would keep none."""
    for name in prunable:
        ratio = (
            max((sparsity.get(m, 0.0) for m in graph.group(name).members), default=0.0)
            if isinstance(sparsity, Mapping)
            else sparsity
        )
        units = output_units(modules[name])
        keep = int(units * (1 - ratio))
        if ratio > 0 and (keep // round_to * round_to if round_to else keep) == 0:
            hint = f"a round_to of at most {keep}" if round_to and keep else "a lower ratio"
            raise PruningError(
                f"at ratio {ratio:g} Torch-Pruning would keep no channel of {name} ({units} units) and skip it "
                f"silently; use {hint}"
            )


def _check_every_group_has_a_norm(graph: Any, prunable: list[str]) -> None:
    """Torch-Pruning 1.6.1's group-lasso regulariser fails (None + float) on a group without BatchNorm: refuse it in
    words."""
    bare = [name for name in prunable if not any(member in graph.norm_after for member in graph.group(name).members)]
    if bare:
        raise PruningError(
            f"group_slim needs a BatchNorm after every pruned layer, and {bare[0]} has none; use slim, or exclude "
            f"{', '.join(bare)}"
        )


def _ratio_dict(
    sparsity: Mapping[str, float], prunable: list[str], modules: dict[str, nn.Module], graph: Any
) -> dict[nn.Module, float]:
    """Every member of a coupled group gets the group's largest ratio, as in scratch (Torch-Pruning takes the first
    member it meets)."""
    for name in sparsity:
        if name not in prunable:
            raise PruningError(
                f"per-layer sparsity names {name!r}, which is not a prunable Conv2d / hidden Linear of this model"
            )
    ratios: dict[nn.Module, float] = {}
    for name in sparsity:
        members = graph.group(name).members
        largest = max(float(sparsity.get(member, 0.0)) for member in members)
        ratios |= {modules[member]: largest for member in members if member in prunable}
    return ratios


def _batches(train_batches: TrainBatches | None, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches without end, on the model's device: the data-driven methods may want more steps than one pass holds."""
    assert train_batches is not None  # validate() refused the request otherwise
    while True:
        empty = True
        for images, labels in train_batches():
            empty = False
            yield images.to(device), labels.to(device)
        if empty:
            raise PruningError("train_batches yielded no batch")


def _gradients(
    model: nn.Module,
    importance: Any,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    count: int,
    per_sample: bool,
) -> None:
    """Taylor: loss gradients summed over `count` batches. Hessian (OBD): the mean squared per-sample gradient, handed
    to the importance.

    We accumulate the squares ourselves: Torch-Pruning 1.6.1's accumulate_grad checks the parameter's name but stores
    under the parameter, so it keeps only the last sample's gradient.
    """
    model.eval()  # BatchNorm statistics stay those of the trained model
    model.zero_grad()
    squares: dict[nn.Parameter, torch.Tensor] = {}
    samples: dict[nn.Parameter, int] = {}
    for images, labels in islice(batches, count):
        if not per_sample:
            F.cross_entropy(model(images), labels).backward()
            continue
        for image, label in zip(images, labels, strict=True):
            model.zero_grad()
            F.cross_entropy(model(image[None]), label[None]).backward()
            for parameter in model.parameters():
                if parameter.grad is not None:
                    squares[parameter] = squares.get(parameter, 0) + parameter.grad.detach().pow(2)
                    samples[parameter] = samples.get(parameter, 0) + 1
    if per_sample:
        importance._accu_grad, importance._counter = squares, samples  # what its own accumulate_grad means to fill


def _sparse_train(
    model: nn.Module,
    pruner: Any,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    learning_rate: float,
) -> int:
    """Torch-Pruning's sparse training: the usual loss, then the pruner's group regulariser on the gradients, then a
    step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    model.train()
    for images, labels in islice(batches, steps):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        pruner.regularize(model)
        optimizer.step()
    model.eval()
    return steps


def _prune(tp: Any, pruner: Any, names: dict[nn.Module, str]) -> dict[str, list[int]]:
    """Prune group by group, noting the output units each Conv2d / Linear loses (depthwise convs follow their
    producer)."""
    out_handlers = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
    removed: dict[str, list[int]] = {}
    for group in pruner.step(interactive=True):
        for item in group.items:
            module = item.dep.target.module
            if item.dep.handler in out_handlers and module in names and type(module) in (nn.Conv2d, nn.Linear):
                removed.setdefault(names[item.dep.target.module], []).extend(int(i) for i in item.idxs)
        group.prune()
    return removed
