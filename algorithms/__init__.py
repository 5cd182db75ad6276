"""From-scratch structured pruning and the analysis tools around it, for any torch.fx-traceable model."""

from .channel_pruning import prune_channels
from .dependency import ChannelDependency, GroupDependency
from .mask_conflict import fix_mask_conflict, resolve_mask_conflict
from .sensitivity import SensitivityAnalysis, export_sensitivity, get_ratios_by_loss, load_sensitivity

__all__ = [
    "ChannelDependency",
    "GroupDependency",
    "SensitivityAnalysis",
    "export_sensitivity",
    "fix_mask_conflict",
    "get_ratios_by_loss",
    "load_sensitivity",
    "prune_channels",
    "resolve_mask_conflict",
]
