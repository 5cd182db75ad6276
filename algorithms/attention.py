"""Multi-head attention whose heads (or head dims) can be pruned: a `qkv` Linear reshaped to (..., 3, heads, head_dim)
(or head by head, (..., heads, rows) split in forward, as EfficientFormer does), attention within each head, and the
heads merged back into one Linear (`proj`), all in one module that says how many heads it runs (`num_heads`), as
timm's ViT / DeiT / Swin / EfficientFormer attention and most ViT code are written.

The channel analysis cannot follow a head axis through the matmuls, so a block is found here, before the walk: its
`qkv` output then counts one unit per head (or per head dim), its `proj` reads the same units, and the ops between
them are left alone. What this check cannot see (an op that mixes heads) the prune catches afterwards: the pruned
model must compute exactly what the original computes with those heads' q, k and v zeroed (see channel_pruning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .tracing import node_shape as _shape
from .tracing import op_name

ATTENTION_MODES = ("heads", "head_dim", "none")

# ops between qkv and proj that act within a head (or broadcast over heads): anything else leaves the block whole
_INNER_OPS = {
    "reshape",
    "view",
    "permute",
    "transpose",
    "unbind",
    "getitem",
    "contiguous",
    "mul",
    "matmul",
    "softmax",
    "scaled_dot_product_attention",
    "add",
    "dropout",
    "unsqueeze",
    "expand",
    "getattr",
    "size",
    "to",
    "type_as",
    "float",
    "split",  # EfficientFormer's q, k, v out of each head's rows
}
_INNER_MODULES = (nn.Dropout, nn.Identity, nn.Softmax)


@dataclass(frozen=True)
class HeadBlock:
    """One attention module: after a prune its `num_heads` (or `head_dim`) and the sizes derived from them are set."""

    module: str
    qkv: str
    proj: str
    heads: int
    head_dim: int
    mode: str  # "heads": a unit is a whole head; "head_dim": a unit is one dim of every head's q, k and v
    # qkv's rows head by head, each head's q, k and v side by side (EfficientFormer, LeViT: reshape(B, N, heads, -1)
    # then split into key, key and value dims), rather than (3, heads, head_dim)
    heads_first: bool = False
    head_rows: int = 0  # heads_first: qkv rows per head
    value_dim: int = 0  # features per head proj reads (head_dim unless heads_first)

    @property
    def units(self) -> int:
        return self.heads if self.mode == "heads" else self.head_dim


@dataclass
class HeadRegion:
    """What the analysis needs of a block: its qkv and proj calls, the nodes between them (not walked), and the
    parameters with one entry per head (Swin's relative-position bias table), with their head axis."""

    block: HeadBlock
    qkv: torch.fx.Node
    proj: torch.fx.Node
    inner: set[torch.fx.Node] = field(default_factory=set)
    per_head: list[tuple[torch.fx.Node, int]] = field(default_factory=list)


def _in_module(node: torch.fx.Node, owner: str) -> bool:
    """Is the node computed in `owner`'s forward (the model's own, for the root)?"""
    return not owner or any(
        key == owner or key.startswith(owner + ".") for key in node.meta.get("nn_module_stack") or {}
    )


def _normalizes_each_head(node: torch.fx.Node, head_dim: int, modules: dict[str, nn.Module]) -> bool:
    """q_norm / k_norm: a LayerNorm over head_dim alone, called (nn.LayerNorm) or traced through (timm's LayerNorm
    calls F.layer_norm): per head, so whole heads may go; not their dims, whose statistics it takes."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (head_dim,)
    shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    return node.op == "call_function" and node.target is F.layer_norm and tuple(shape or ()) == (head_dim,)


def find_regions(
    graph_module: torch.fx.GraphModule, modules: dict[str, nn.Module], mode: str
) -> tuple[dict[torch.fx.Node, HeadRegion], dict[torch.fx.Node, str]]:
    """The prunable attention blocks, keyed by their qkv call, and the qkv calls of blocks left whole, with why."""
    regions: dict[torch.fx.Node, HeadRegion] = {}
    refused: dict[torch.fx.Node, str] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or type(modules.get(str(node.target))) is not nn.Linear:
            continue
        owner = str(node.target).rpartition(".")[0]
        heads = getattr(modules.get(owner), "num_heads", None)
        split = list(node.users)
        shape = _shape(split[0]) if len(split) == 1 else None
        rows = modules[str(node.target)].out_features
        if (
            not isinstance(heads, int)
            or isinstance(heads, bool)
            or shape is None
            or op_name(split[0]) not in ("reshape", "view")
            or len(shape) < 3
        ):
            continue
        if len(shape) > 3 and shape[-3:-1] == (3, heads) and 3 * heads * shape[-1] == rows:
            head_rows, heads_first = shape[-1], False  # (..., 3, heads, head_dim)
        elif shape[-2] == heads and heads * shape[-1] == rows:
            head_rows, heads_first = shape[-1], True  # (..., heads, q k v of the head)
        else:
            continue  # not the qkv of a block that runs `num_heads` heads
        if mode == "none":
            refused[node] = f"attention heads of {owner} are left whole (attention='none')"
            continue
        if heads_first and mode == "head_dim":
            refused[node] = (
                f"attention heads of {owner} keep their dims: head_dim pruning needs q, k and v reshaped as (3, heads, "
                "head_dim), and this block splits each head's rows itself"
            )
            continue
        found = _region(node, split[0], owner, heads, head_rows, heads_first, modules, mode)
        if isinstance(found, str):
            refused[node] = f"attention heads of {owner} cannot be pruned: {found}"
        else:
            regions[node] = found
    return regions, refused


def _region(
    qkv: torch.fx.Node,
    split: torch.fx.Node,
    owner: str,
    heads: int,
    head_rows: int,
    heads_first: bool,
    modules: dict[str, nn.Module],
    mode: str,
) -> HeadRegion | str:
    """The nodes from qkv's reshape to the one Linear of the same module that reads heads x head_dim features (any
    multiple of heads when each head's rows are split in forward); a reason when anything between them leaves the
    module, mixes in the input, or is an op not known to stay within a head."""
    head_dim = -1 if heads_first else head_rows  # a per-head LayerNorm is over head_dim; unknown when split in forward
    inner: set[torch.fx.Node] = set()
    proj: list[torch.fx.Node] = []
    stack = [split]
    while stack:
        node = stack.pop()
        if node in inner or node in proj:
            continue
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if (
            type(module) is nn.Linear
            and str(node.target).rpartition(".")[0] == owner
            and (module.in_features == heads * head_rows if not heads_first else module.in_features % heads == 0)
            and _shape(node.args[0]) is not None
            and _shape(node.args[0])[-1] == module.in_features
        ):
            proj.append(node)
            continue
        if node.op == "output" or not _in_module(node, owner):
            return f"its heads reach {node.name} outside {owner} other than through one output Linear"
        if mode == "heads" and _normalizes_each_head(node, head_dim, modules):
            allowed = True
        elif node.op == "call_module":
            allowed = isinstance(module, _INNER_MODULES)
        else:
            allowed = op_name(node) in _INNER_OPS
        if not allowed:
            return f"{node.name} ({op_name(node)}) is not known to keep heads apart"
        inner.add(node)
        stack.extend(node.users)
    if len(proj) != 1:
        return f"its heads reach {len(proj)} Linears of {owner}, not one"
    per_head = _per_head_parameters(inner, qkv, owner, heads, modules, mode)
    if isinstance(per_head, str):
        return per_head
    value_dim = modules[str(proj[0].target)].in_features // heads
    block = HeadBlock(
        owner, str(qkv.target), str(proj[0].target), heads, head_rows, mode, heads_first, head_rows, value_dim
    )
    return HeadRegion(block, qkv, proj[0], inner, per_head)


def _per_head_parameters(
    inner: set[torch.fx.Node], qkv: torch.fx.Node, owner: str, heads: int, modules: dict[str, nn.Module], mode: str
) -> list[tuple[torch.fx.Node, int]] | str:
    """Tensors mixed into the attention from outside its path must not depend on the input or come out of a module
    (an attention mask or a position bias read from parameters may); in "heads" mode the parameters of the block among
    them with one axis of `heads` entries are sliced with the heads."""
    found: list[tuple[torch.fx.Node, int]] = []
    seen: set[torch.fx.Node] = set()
    stack = [arg for node in inner for arg in node.all_input_nodes if arg not in inner and arg is not qkv]
    while stack:
        node = stack.pop()
        if node in seen or node.meta.get("tensor_meta") is None:
            continue  # a size read from a shape is a number, not data
        seen.add(node)
        if node.op == "placeholder":
            return f"{node.name} mixes in a tensor computed from the input"
        if node.op == "call_module":
            return f"{node.name} mixes in the output of {node.target}, which would have to follow the heads"
        shape = _shape(node)
        if node.op == "get_attr" and mode == "heads" and shape is not None:
            parent, _, attr = str(node.target).rpartition(".")
            axes = [d for d, size in enumerate(shape) if size == heads]
            if parent == owner and isinstance(getattr(modules.get(parent), attr, None), nn.Parameter) and axes:
                if len(axes) > 1:
                    return f"{node.target} has {len(axes)} axes of {heads} entries: which one is the heads' is unclear"
                found.append((node, axes[0]))
        stack.extend(node.all_input_nodes)
    return found


# widths of all heads together that attention modules keep as attributes and read in forward (timm: attn_dim for
# ViT's reshape back, key_attn_dim / val_attn_dim for EfficientFormer's and LeViT's)
HEADS_WIDE = ("attn_dim", "key_attn_dim", "val_attn_dim")


def set_head_attributes(module: nn.Module, block: HeadBlock, kept: int) -> None:
    """The pruned module's head count and the sizes derived from it; its softmax scale stays the original's."""
    if block.mode == "head_dim":  # (Swin's reshapes leave head_dim to the tensor: it keeps no attribute of it)
        for name, value in (("head_dim", kept), ("attn_dim", block.heads * kept)):
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, value)
        return
    module.num_heads = kept
    for name in HEADS_WIDE:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value % block.heads == 0:
            setattr(module, name, value // block.heads * kept)


def keep_softmax_scale(module: nn.Module, block: HeadBlock, kept: int) -> None:
    """Fewer dims per head: PyTorch's fused attention would scale by 1/sqrt(kept dims). The q rows take the factor that
    restores the original 1/sqrt(head_dim), and a `scale` attribute (timm's unfused path multiplies q by it) the
    inverse, so either path computes what the original did."""
    factor = math.sqrt(kept / block.head_dim)
    qkv = module.get_submodule(block.qkv[len(block.module) + 1 :] if block.module else block.qkv)
    rows = qkv.out_features // 3
    with torch.no_grad():
        qkv.weight[:rows].mul_(factor)
        if qkv.bias is not None:
            qkv.bias[:rows].mul_(factor)
    if isinstance(getattr(module, "scale", None), float):
        module.scale = module.scale / factor
