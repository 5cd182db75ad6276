"""Build smaller Conv2d / Linear / BatchNorm modules from sliced tensors, and copy module trees.

Modules are copied through their `__dict__` instead of `copy.deepcopy` or their
constructors: deepcopy of resnet18 alone costs ~100 ms and a constructor
re-initialises weights we are about to overwrite (DESIGN.md section 6).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
# a layer's own per-unit tensors: what a sliced BatchNorm slices, and what a functional layer op is handed
LAYER_TENSORS = ("weight", "bias", "running_mean", "running_var")


def has_norm(model: nn.Module) -> bool:
    return any(isinstance(module, NORM_TYPES) for module in model.modules())


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Eval mode for the block; afterwards every submodule gets its own mode back, even a part kept in eval on
    purpose."""
    modes = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.__dict__["training"] = mode  # plain attribute; skips nn.Module.__setattr__


def output_units(layer: nn.Module) -> int:
    """Output channels of a Conv2d / units of a Linear: the rows of its weight."""
    return int(layer.weight.shape[0])


def is_depthwise(conv: nn.Conv2d) -> bool:
    """A conv whose every output channel reads exactly its own input channel."""
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _shallow_copy(module: nn.Module) -> nn.Module:
    new = module.__class__.__new__(module.__class__)
    # dict.copy keeps OrderedDict
    new.__dict__ = {key: (value.copy() if isinstance(value, dict) else value) for key, value in module.__dict__.items()}
    return new


def drop_tensor_caches(module: nn.Module) -> None:
    """A module whose own tensors were cut: a dict of tensors it holds is computed from them (timm's LeViT and
    EfficientFormer cache attention biases per device) at the old widths, so it starts empty and is rebuilt."""
    for key, value in vars(module).items():  # not torch's own (_parameters, _buffers, ...)
        plain = not key.startswith("_") and isinstance(value, dict) and value
        if plain and all(isinstance(v, torch.Tensor) for v in value.values()):
            module.__dict__[key] = type(value)()


def _param(tensor: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(tensor.detach().contiguous(), requires_grad=like.requires_grad)


def _take(tensor: torch.Tensor, index: torch.Tensor | None, dim: int) -> torch.Tensor:
    """The entries `index` keeps along `dim`, on the tensor's device (indices are computed on the CPU)."""
    return tensor.detach().clone() if index is None else tensor.detach().index_select(dim, index.to(tensor.device))


def sliced_tensor(module: nn.Module, attr: str, index: torch.Tensor, dim: int) -> None:
    """Keep `index` along `dim` of one parameter or buffer of `module` (a copy already): a layer scale, a per-channel
    bias."""
    if attr in module._parameters:
        module._parameters[attr] = _param(_take(module._parameters[attr], index, dim), module._parameters[attr])
    else:
        module._buffers[attr] = _take(module._buffers[attr], index, dim)


def sliced_module(module: nn.Module, out_index: torch.Tensor | None, in_index: torch.Tensor | None) -> nn.Module:
    """A copy of a Conv2d / Linear / BatchNorm / LayerNorm keeping the given output and input units.

    For BatchNorm, LayerNorm and depthwise convs the channels are one axis: `in_index` is used.
    """
    new = _shallow_copy(module)
    # a subclass's own children (timm's BatchNormAct2d activation): copies, never the caller's modules
    new._modules = {name: None if child is None else clone_tree(child, {}) for name, child in module._modules.items()}
    for tensors, copies in ((module._parameters, new._parameters), (module._buffers, new._buffers)):
        for key, value in tensors.items():  # a subclass's other tensors: copied whole, as clone_tree would
            if key not in LAYER_TENSORS and value is not None:
                copies[key] = _param(value.detach().clone(), value) if key in module._parameters else value.clone()
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        for key, value in module._parameters.items():
            new._parameters[key] = None if value is None else _param(_take(value, in_index, 0), value)
        if isinstance(module, nn.LayerNorm):
            new.normalized_shape = (len(in_index),)
        else:
            new.num_channels = len(in_index)
        return new
    if isinstance(module, NORM_TYPES):
        index = in_index
        # a subclass's other tensors are no business of a BatchNorm's: copied whole
        for key, value in module._parameters.items():
            sliced = value is not None and key in LAYER_TENSORS
            new._parameters[key] = None if value is None else _param(_take(value, index if sliced else None, 0), value)
        for key, value in module._buffers.items():
            if value is not None and value.ndim == 1 and key in LAYER_TENSORS:
                new._buffers[key] = _take(value, index, 0)
            else:
                new._buffers[key] = None if value is None else value.detach().clone()
        new.num_features = int(new._buffers.get("running_mean", new._parameters.get("weight")).shape[0])
        return new
    if isinstance(module, nn.Conv2d) and is_depthwise(module):
        out_index = in_index
        in_index = None
    elif isinstance(module, nn.Conv2d) and module.groups > 1 and in_index is not None:
        return _sliced_grouped_conv(module, new, out_index, in_index)
    weight = (
        _take(_take(module.weight, out_index, 0), in_index, 1)
        if in_index is not None
        else _take(module.weight, out_index, 0)
    )
    new._parameters["weight"] = _param(weight, module.weight)
    if module.bias is not None:
        new._parameters["bias"] = _param(_take(module.bias, out_index, 0), module.bias)
    _set_shape_attributes(new, module)
    return new


def _sliced_grouped_conv(
    module: nn.Conv2d, new: nn.Module, out_index: torch.Tensor | None, in_index: torch.Tensor
) -> nn.Module:
    """Output block j of a grouped conv reads input block j: each kept output row keeps its own block's kept inputs."""
    groups, in_per, out_per = module.groups, module.in_channels // module.groups, module.out_channels // module.groups
    outputs = torch.arange(module.out_channels) if out_index is None else out_index
    blocks = (in_index // in_per).view(groups, -1) if len(in_index) % groups == 0 else None
    if blocks is None or not bool((blocks == torch.arange(groups)[:, None]).all()):
        raise ValueError(f"grouped conv input channels must keep the same count in each of its {groups} groups")
    local = (in_index % in_per).view(groups, -1)[outputs // out_per]  # per kept output: its block's kept inputs
    weight = module.weight.detach()[outputs.to(module.weight.device)]
    weight = weight.gather(1, local[:, :, None, None].expand(-1, -1, *weight.shape[2:]).to(weight.device))
    new._parameters["weight"] = _param(weight, module.weight)
    if module.bias is not None:
        new._parameters["bias"] = _param(_take(module.bias, out_index, 0), module.bias)
    _set_shape_attributes(new, module)
    return new


def _set_shape_attributes(new: nn.Module, old: nn.Module) -> None:
    weight = new._parameters["weight"]
    if isinstance(new, nn.Conv2d):
        new.out_channels = int(weight.shape[0])
        if is_depthwise(old):
            new.groups = new.out_channels
        new.in_channels = int(weight.shape[1]) * new.groups
    elif isinstance(new, nn.Linear):
        new.out_features, new.in_features = (int(d) for d in weight.shape)


def clone_tree(
    model: nn.Module, replacements: dict[str, nn.Module], prefix: str = "", memo: dict[int, nn.Module] | None = None
) -> nn.Module:
    """An independent copy of `model` (same classes, cloned tensors) with named submodules replaced."""
    memo = {} if memo is None else memo
    if prefix in replacements:
        return replacements[prefix]
    if id(model) in memo:
        return memo[id(model)]
    new = _shallow_copy(model)
    memo[id(model)] = new
    for key, value in model._parameters.items():
        new._parameters[key] = None if value is None else _param(value.detach().clone(), value)
    for key, value in model._buffers.items():
        new._buffers[key] = None if value is None else value.detach().clone()
    for key, child in model._modules.items():
        new._modules[key] = (
            None if child is None else clone_tree(child, replacements, f"{prefix}.{key}" if prefix else key, memo)
        )
    return new


def resize_to_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Shrink a freshly built model's tensors, in place, to saved shapes, and the size attributes of the layers holding
    them.

    This is how a pruned snapshot is rebuilt from shapes alone: no pickled modules. Tensors of other modules (a layer
    scale) are resized as they are.
    """
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        current = {
            key: value for key, value in (*module._parameters.items(), *module._buffers.items()) if value is not None
        }
        changed = {
            key: state_dict[prefix + key]
            for key, value in current.items()
            if prefix + key in state_dict and state_dict[prefix + key].shape != value.shape
        }
        if not changed:
            continue
        old_depthwise = isinstance(module, nn.Conv2d) and is_depthwise(module)
        for key, value in changed.items():
            if key in module._parameters:
                module._parameters[key] = nn.Parameter(
                    torch.zeros_like(value), requires_grad=module._parameters[key].requires_grad
                )
            else:
                module._buffers[key] = torch.zeros_like(value)
        if isinstance(module, NORM_TYPES):
            module.num_features = int(next(iter(changed.values())).shape[0])
        elif isinstance(module, nn.LayerNorm):
            module.normalized_shape = (int(next(iter(changed.values())).shape[0]),)
        elif isinstance(module, nn.GroupNorm):
            module.num_channels = int(next(iter(changed.values())).shape[0])
        elif isinstance(module, nn.Conv2d):
            module.out_channels = int(module.weight.shape[0])
            if old_depthwise:
                module.groups = module.out_channels
            module.in_channels = int(module.weight.shape[1]) * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = (int(d) for d in module.weight.shape)
    return model
