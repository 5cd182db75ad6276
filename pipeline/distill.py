"""Knowledge distillation for refine (step 3): the pruned student learns from the base model's softened logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.modules import eval_mode


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """(1 - alpha) * CE(labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al. 2015).

    T^2 keeps the soft term's gradients on the scale of the hard term's as T grows.
    """
    hard = F.cross_entropy(student_logits, labels)
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1), reduction="batchmean", log_target=True
    )
    return (1.0 - alpha) * hard + alpha * temperature**2 * soft


@dataclass
class Distillation:
    """The loss a training step uses: the student against labels and the frozen teacher, which runs in eval mode without gradients."""

    teacher: nn.Module
    alpha: float = 0.9
    temperature: float = 4.0

    def __call__(self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.teacher), torch.no_grad():
            teacher_logits = self.teacher(images)
        return kd_loss(student(images), teacher_logits, labels, self.alpha, self.temperature)
