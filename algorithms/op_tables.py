"""What the channel analysis knows of torch's ops: which carry channels through unchanged, which unite, reshape, permute
or split them, and which functional ops a layer runs on its own tensors (with how to read such a call). graph.py walks
with them."""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth, stochastic_depth  # per-sample (N, 1, 1, 1) scaling: channel-wise

from .modules import LAYER_TENSORS, NORM_TYPES

# Every parameter-free activation of torch.nn / torch.nn.functional is channel-wise: channel c of the output depends on
# channel c of the input alone, so it carries the channel layout through unchanged (GLU, Softmax, LogSoftmax, Softmin
# mix
# or halve channels and are not here; PReLU is here only with one shared slope, see call_module).
ELEMENTWISE_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Tanhshrink,
    nn.Threshold,
    nn.Sigmoid,
    nn.LogSigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
)
PASSTHROUGH_MODULES = (
    *ELEMENTWISE_ACTIVATIONS,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.Identity,
    StochasticDepth,
)
# per channel over dims 2..: channels on dim 1 only
SPATIAL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample)
ELEMENTWISE_ACTIVATION_FUNCTIONS = {
    F.relu,
    F.relu_,
    F.relu6,
    F.leaky_relu,
    F.leaky_relu_,
    F.rrelu,
    F.rrelu_,
    F.elu,
    F.elu_,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.hardtanh_,
    F.hardshrink,
    F.softshrink,
    F.tanhshrink,
    F.threshold,
    F.threshold_,
    F.sigmoid,
    F.logsigmoid,
    F.tanh,
    F.softplus,
    F.softsign,
    torch.relu,
    torch.relu_,
    torch.sigmoid,
    torch.sigmoid_,
    torch.tanh,
    torch.tanh_,
    torch.selu,
    torch.selu_,
    torch.celu,
    torch.celu_,
    torch.rrelu,
    torch.rrelu_,
    torch.clamp,
    torch.clamp_,
}
# pointwise arithmetic of one tensor (a norm written out: (x - u).pow(2), torch.sqrt(s + eps)); a second tensor
# operand with channels is refused in passthrough()
POINTWISE_MATH = {torch.sqrt, torch.rsqrt, torch.exp, torch.abs, torch.square, torch.pow, operator.pow, operator.neg}
POINTWISE_MATH_METHODS = {"sqrt", "rsqrt", "exp", "abs", "square", "pow", "neg"}
PASSTHROUGH_FUNCTIONS = {
    *ELEMENTWISE_ACTIVATION_FUNCTIONS,
    *POINTWISE_MATH,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    stochastic_depth,
}
SPATIAL_FUNCTIONS = {
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.interpolate,
    torch.max_pool2d,
}
PASSTHROUGH_METHODS = {
    *POINTWISE_MATH_METHODS,
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "clamp",
    "clamp_",
    "contiguous",
    "clone",
    "detach",
    "float",
    "to",
}
ELEMENTWISE = {
    operator.add,
    operator.iadd,
    operator.mul,
    operator.imul,
    operator.sub,
    operator.truediv,
    torch.add,
    torch.mul,
    torch.sub,
    torch.div,
    torch.addcmul,  # bias + weight * x: timm's GlobalResponseNorm
}
ELEMENTWISE_METHODS = {"add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_", "addcmul"}
RESHAPES = {torch.flatten, torch.reshape}
RESHAPE_METHODS = {"view", "reshape", "flatten", "reshape_as", "view_as"}
REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.norm, torch.linalg.vector_norm}
REDUCTION_METHODS = {"mean", "sum", "amax", "norm"}
# reductions whose first argument after the tensor is the norm's order: their dims come one later
NORMS = {torch.norm, torch.linalg.vector_norm, "norm"}
PERMUTES = {torch.permute, torch.transpose, torch.swapaxes, torch.swapdims}
PERMUTE_METHODS = {"permute", "transpose", "swapaxes", "swapdims"}
SPLITS = {torch.chunk, torch.split}
SPLIT_METHODS = {"chunk", "split"}
# ops a channel shuffle passes through
SPLIT_AWARE = PERMUTES | RESHAPES | {"contiguous", "clone"} | PERMUTE_METHODS | RESHAPE_METHODS
NON_TENSOR_METHODS = {"size", "dim"}
# F.op(x, ...) run by a module of these kinds on its own tensors: the functional call's argument names, by position
FUNCTIONAL_MODULE_CALLS = {
    F.batch_norm: (NORM_TYPES, ("input", "running_mean", "running_var", "weight", "bias", "training")),
    F.layer_norm: (nn.LayerNorm, ("input", "normalized_shape", "weight", "bias", "eps")),
    F.group_norm: (nn.GroupNorm, ("input", "num_groups", "weight", "bias", "eps")),
    F.linear: (nn.Linear, ("input", "weight", "bias")),
    F.conv2d: (nn.Conv2d, ("input", "weight", "bias", "stride", "padding", "dilation", "groups")),
}


def functional_arguments(node: torch.fx.Node) -> dict[str, object]:
    """The arguments of a call of FUNCTIONAL_MODULE_CALLS by name, however they were passed."""
    _, names = FUNCTIONAL_MODULE_CALLS[node.target]
    return dict(zip(names, node.args, strict=False)) | node.kwargs


def functional_tensors(node: torch.fx.Node) -> dict[str, torch.fx.Node]:
    """The layer tensors (weight, bias, running statistics) a functional layer call is handed as graph values."""
    args = functional_arguments(node)
    return {key: args[key] for key in LAYER_TENSORS if isinstance(args.get(key), torch.fx.Node)}


def hands_own_tensors(node: torch.fx.Node, module: nn.Module, prefix: str) -> bool:
    """Is this functional layer op handed exactly `module`'s own tensors (read as `prefix` + name), and its groups or
    normalized_shape? Then it computes what a call of the module would."""
    _, names = FUNCTIONAL_MODULE_CALLS[node.target]
    args, tensors = functional_arguments(node), functional_tensors(node)
    own = {key: prefix + key for key in names if key in LAYER_TENSORS and getattr(module, key, None) is not None}
    shape = tuple(args.get("normalized_shape") or ())
    return (
        all(t.op == "get_attr" for t in tensors.values())
        and {key: str(t.target) for key, t in tensors.items()} == own
        and (not isinstance(module, nn.LayerNorm) or shape == module.normalized_shape)
        and (not isinstance(module, nn.Conv2d) or args.get("groups", 1) == module.groups)
        and (not isinstance(module, nn.GroupNorm) or args.get("num_groups") == module.num_groups)
    )
