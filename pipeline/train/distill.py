"""Knowledge distillation for refine (step 3): the pruned student learns from the base model's softened logits,
optionally also from its intermediate feature maps (--kd_features)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from algorithms.modules import eval_mode
from pipeline.errors import UsageError


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """(1 - alpha) * CE(labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al. 2015).

    T^2 keeps the soft term's gradients on the scale of the hard term's as T grows.
    """
    hard = F.cross_entropy(student_logits, labels)
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * hard + alpha * temperature**2 * soft


@dataclass
class Distillation:
    """The loss a training step uses: the student against labels and the frozen teacher, which runs in eval mode without
    gradients."""

    teacher: nn.Module
    alpha: float = 0.9
    temperature: float = 4.0

    def __call__(self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.teacher), torch.no_grad():
            teacher_logits = self.teacher(images)
        return kd_loss(student(images), teacher_logits, labels, self.alpha, self.temperature)


AUTO_FEATURE_LAYERS = 4


def feature_layers(model: nn.Module, request: str) -> list[str]:
    """The layers whose outputs feature distillation matches: the named ones, or `auto`: up to four Conv2d / Linear
    layers spread evenly over the network's depth, ending at the last one before the classifier (the last Linear, whose
    logits the soft-target term already matches)."""
    layers = [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    if request == "auto":
        if layers and isinstance(dict(model.named_modules())[layers[-1]], nn.Linear):
            layers = layers[:-1]
        if len(layers) <= AUTO_FEATURE_LAYERS:
            return layers
        step = len(layers) / AUTO_FEATURE_LAYERS
        return [layers[len(layers) - 1 - round(i * step)] for i in reversed(range(AUTO_FEATURE_LAYERS))]
    names = [name.strip() for name in request.split(",") if name.strip()]
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown or not names:
        shown = ", ".join(layers[:8]) + (", ..." if len(layers) > 8 else "")
        raise UsageError(
            f"--kd_features names no layer {unknown[0] if unknown else request!r} of {type(model).__name__}; use auto "
            f"or some of: {shown}"
        )
    return names


@contextlib.contextmanager
def _outputs_of(model: nn.Module, layers: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """The outputs of `layers` during the forwards inside the block; the hooks are gone afterwards."""
    captured: dict[str, torch.Tensor] = {}
    # the model's own layer names, not DDP's "module.*"
    own = model.module if isinstance(model, DistributedDataParallel) else model
    modules = dict(own.named_modules())
    # a copy: an in-place activation after the layer (ReLU(inplace=True)) would otherwise overwrite what was captured
    handles = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, _copied(out)))
        for name in layers
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _copied(output: object) -> object:
    # a layer returning a tuple is refused by build()
    return output.clone() if isinstance(output, torch.Tensor) else output


def _projection(student_width: int, teacher_width: int, ndim: int) -> nn.Module:
    """Student map -> teacher's width (FitNets' regressor): a 1x1 conv for feature maps, a Linear for vectors."""
    if student_width == teacher_width:
        return nn.Identity()
    return (
        nn.Conv2d(student_width, teacher_width, 1, bias=False)
        if ndim == 4
        else nn.Linear(student_width, teacher_width, bias=False)
    )


@dataclass
class FeatureDistillation:
    """Distillation plus `weight` x the mean MSE between matching intermediate outputs of student and teacher.

    The pruned student has fewer channels than the teacher at most layers: learned projections map the student's outputs
    to the teacher's width. They train with the student (train() optimises `parameters()`) and are thrown away
    afterwards.
    """

    logits: Distillation
    layers: list[str]
    projections: nn.ModuleDict
    weight: float = 1.0

    @classmethod
    def build(
        cls,
        teacher: nn.Module,
        student: nn.Module,
        layers: list[str],
        example: torch.Tensor,
        alpha: float,
        temperature: float,
        weight: float,
    ) -> FeatureDistillation:
        with torch.no_grad(), eval_mode(teacher), eval_mode(student):
            with _outputs_of(teacher, layers) as wanted:
                teacher(example)
            with _outputs_of(student, layers) as given:
                student(example)
        for name in layers:
            if (
                not isinstance(given.get(name), torch.Tensor)
                or given[name].shape[2:] != wanted[name].shape[2:]
                or given[name].ndim not in (2, 4)
            ):
                raise UsageError(
                    f"--kd_features layer {name} gives no (N, C) or (N, C, H, W) tensor matching the teacher's; name "
                    "Conv2d or Linear layers"
                )
        projections = nn.ModuleDict(
            {
                name.replace(".", "/"): _projection(given[name].shape[1], wanted[name].shape[1], given[name].ndim)
                for name in layers
            }
        )
        projections.to(example.device)
        return cls(Distillation(teacher, alpha, temperature), layers, projections, weight)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The projections': what train() optimises besides the student."""
        return self.projections.parameters()

    def __call__(self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The logit loss plus the weighted feature term, for one batch."""
        with eval_mode(self.logits.teacher), torch.no_grad(), _outputs_of(self.logits.teacher, self.layers) as wanted:
            teacher_logits = self.logits.teacher(images)
        with _outputs_of(student, self.layers) as given:
            student_logits = student(images)
        matched = [
            F.mse_loss(self.projections[name.replace(".", "/")](given[name]), wanted[name]) for name in self.layers
        ]
        logit_loss = kd_loss(student_logits, teacher_logits, labels, self.logits.alpha, self.logits.temperature)
        return logit_loss + self.weight * torch.stack(matched).mean()
