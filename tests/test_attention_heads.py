"""Attention heads (#27): whole heads (or the same dims of every head) of multi-head attention blocks are pruned, the
block's num_heads / head_dim follow, its softmax scale stays, and the pruned model computes exactly what the original
computes with the removed heads' q, k and v zeroed. On a small fixture written here, and on timm's ViT, DeiT and Swin,
where Torch-Pruning 1.6.1's own pruned model does not run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from algorithms.channel_pruning import prune_channels
from algorithms.errors import PruningError
from algorithms.graph import analyze
from backends import get_backend
from tests.helpers import consumer_zeroed_reference, relative_error

X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))  # (batch, tokens, features)


class Attention(nn.Module):
    """timm's Attention in small: qkv -> (B, N, 3, heads, head_dim) -> scaled dot product -> proj, fused or not."""

    def __init__(self, dim: int = 16, heads: int = 4, head_dim: int = 6, fused: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = heads, head_dim, heads * head_dim
        self.scale, self.fused = head_dim**-0.5, fused
        self.qkv = nn.Linear(dim, 3 * self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(x))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.merged(x, B, N)

    def merged(self, x: torch.Tensor, B: int, N: int) -> torch.Tensor:
        return x.transpose(1, 2).reshape(B, N, self.attn_dim)


class HeadsAndTokensMixed(Attention):
    """A classic slip: the heads merged without moving them next to their dims first, so each output row mixes heads
    and tokens. Every op is one a head-preserving block uses; only the numbers tell."""

    def merged(self, x: torch.Tensor, B: int, N: int) -> torch.Tensor:
        return x.reshape(B, N, self.attn_dim)


class Gated(Attention):
    """An output gate computed from the input (timm's gated attention): the gate's rows would have to follow heads."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(16, self.attn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(x) * self.gate(x).sigmoid())


class HeadsFirst(nn.Module):
    """EfficientFormer's attention in small: qkv's rows head by head (each head's q, k and v side by side), split in
    forward by key and value dims; a learned bias per head, cached per device when not training."""

    def __init__(self, dim: int = 16, heads: int = 4, key_dim: int = 3, val_dim: int = 5) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = heads, key_dim, val_dim
        self.key_attn_dim, self.val_attn_dim, self.scale = heads * key_dim, heads * val_dim, key_dim**-0.5
        self.qkv = nn.Linear(dim, heads * (2 * key_dim + val_dim))
        self.proj = nn.Linear(self.val_attn_dim, dim)
        self.attention_biases = nn.Parameter(torch.randn(heads, 5, 5))
        self.cache: dict[str, torch.Tensor] = {}

    def biases(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.attention_biases
        if str(device) not in self.cache:
            self.cache[str(device)] = self.attention_biases * 1.0
        return self.cache[str(device)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, self.num_heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        attn = ((q @ k.transpose(-2, -1)) * self.scale + self.biases(x.device)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.val_attn_dim))


class Block(nn.Module):
    """A transformer block around an attention module: the MLP prunes as channels, the residual stream not."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(16), attention
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


def block(attention: nn.Module | None = None, seed: int = 0) -> Block:
    torch.manual_seed(seed)
    return Block(attention or Attention()).eval()


def by_hand(model: Block, kept_heads: list[int], x: torch.Tensor = X) -> torch.Tensor:
    """The original with the q, k and v rows of every other head zeroed: written here, not by the project's helpers."""
    attention = model.attn
    rows = torch.zeros(3, attention.num_heads, attention.head_dim)
    rows[:, kept_heads] = 1.0
    handle = attention.qkv.register_forward_hook(lambda _m, _i, out: out * rows.flatten())
    try:
        with torch.no_grad():
            return model(x)
    finally:
        handle.remove()


@pytest.mark.parametrize("fused", [True, False])
def test_whole_heads_go_and_the_block_computes_the_original_without_them(fused):
    model = block(Attention(fused=fused))
    result = prune_channels(model, "conv_all", 0.5, X, scope="layer")
    pruned = result.model.attn
    assert (pruned.num_heads, pruned.head_dim, pruned.attn_dim, pruned.scale) == (2, 6, 12, 6**-0.5)
    assert pruned.qkv.weight.shape == (36, 16) and pruned.proj.weight.shape == (16, 12)
    assert result.heads == {"attn": 2} and result.model.fc1.out_features == 16  # the MLP prunes beside the heads
    with torch.no_grad():
        assert relative_error(result.model(X), consumer_zeroed_reference(model, result.kept, X)) < 1e-5
    heads_only = prune_channels(model, "conv_all", {"attn.qkv": 0.5}, X)
    kept_heads = sorted({row // 6 % 4 for row in heads_only.kept["attn.qkv"]})
    assert len(kept_heads) == 2 and len(heads_only.kept["attn.qkv"]) == 36
    with torch.no_grad():
        assert relative_error(heads_only.model(X), by_hand(model, kept_heads)) < 1e-5


def test_heads_whose_rows_are_split_in_forward_go_whole_with_their_bias_and_a_fresh_cache():
    model = block(HeadsFirst())
    with torch.no_grad():
        model(X)  # the caller evaluated first: its cache holds biases of four heads
    result = prune_channels(model, "conv_all", {"attn.qkv": 0.5}, X)
    pruned = result.model.attn
    assert (pruned.num_heads, pruned.key_attn_dim, pruned.val_attn_dim) == (2, 6, 10)
    assert pruned.qkv.out_features == 2 * 11 and pruned.attention_biases.shape == (2, 5, 5)
    # the copy started its cache empty and rebuilt it at two heads; the caller's is as it was
    assert [t.shape[0] for t in pruned.cache.values()] == [2] and [t.shape[0] for t in model.attn.cache.values()] == [4]
    kept_heads = sorted({row // 11 for row in result.kept["attn.qkv"]})
    rows = torch.zeros(4, 11)
    rows[kept_heads] = 1.0
    handle = model.attn.qkv.register_forward_hook(lambda _m, _i, out: out * rows.flatten())
    try:
        with torch.no_grad():
            assert relative_error(result.model(X), model(X)) < 1e-5
    finally:
        handle.remove()
    assert (
        "head_dim pruning needs q, k and v reshaped as (3, heads, head_dim)"
        in (analyze(model, X, "head_dim").why_unprunable()["attn.qkv"])
    )


def test_heads_are_ranked_by_all_their_weights_and_the_lowest_go():
    model = block()
    with torch.no_grad():  # head 2 owns the smallest q, k, v rows and proj columns; head 0 the largest
        model.attn.qkv.weight.view(3, 4, 6, 16)[:, 2] *= 0.01
        model.attn.proj.weight.view(16, 4, 6)[:, :, 0] *= 10
    kept = prune_channels(model, "conv_all", {"attn.qkv": 0.25}, X).kept["attn.qkv"]
    assert sorted({row // 6 % 4 for row in kept}) == [0, 1, 3]


def test_the_data_driven_ranking_removes_the_head_that_adds_nothing_whatever_its_weights():
    model = block()
    with torch.no_grad():  # head 1: the largest q, k, v rows of all, but proj never reads what it computes
        model.attn.qkv.weight.view(3, 4, 6, 16)[:, 1] *= 100
        model.attn.proj.weight.view(16, 4, 6)[:, 1] = 0
    by_weights = prune_channels(model, "conv_all", {"attn.qkv": 0.25}, X).kept["attn.qkv"]
    by_data = get_backend("scratch").prune(model, "activation", {"attn.qkv": 0.25}, X).kept["attn.qkv"]
    assert 1 in {row // 6 % 4 for row in by_weights}
    assert sorted({row // 6 % 4 for row in by_data}) == [0, 2, 3]


@pytest.mark.parametrize("fused", [True, False])
def test_head_dim_prunes_the_same_dims_of_every_head_and_keeps_the_softmax_scale(fused):
    model = block(Attention(fused=fused))
    result = prune_channels(model, "l2", 0.5, X, scope="layer", attention="head_dim", methods=_methods())
    pruned = result.model.attn
    assert (pruned.num_heads, pruned.head_dim, pruned.attn_dim) == (4, 3, 12)
    kept_dims = sorted({row % 6 for row in result.kept["attn.qkv"]})
    assert all({row % 6 for row in result.kept["attn.qkv"][i * 12 : i * 12 + 12]} == set(kept_dims) for i in range(3))
    with torch.no_grad():
        assert relative_error(pruned(X), _dims_zeroed(model.attn, kept_dims)) < 1e-5
        pruned.fused = not fused  # the other attention path computes the same: scale and q rows agree
        assert relative_error(pruned(X), _dims_zeroed(model.attn, kept_dims)) < 1e-5


def _methods() -> dict:
    from algorithms.criteria import SCRATCH_METHODS

    return SCRATCH_METHODS


def _dims_zeroed(attention: Attention, kept_dims: list[int]) -> torch.Tensor:
    """The original attention with every other dim of every head's q, k and v zeroed, at the original scale."""
    rows = torch.zeros(3, attention.num_heads, attention.head_dim)
    rows[:, :, kept_dims] = 1.0
    handle = attention.qkv.register_forward_hook(lambda _m, _i, out: out * rows.flatten())
    try:
        return attention(X)
    finally:
        handle.remove()


def test_every_block_keeps_a_head_and_pruning_leaves_the_callers_model_alone():
    model = block()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = prune_channels(model, "conv_all", 0.99, X, scope="global")
    assert first.model.attn.num_heads == 1 and model.attn.num_heads == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert prune_channels(model, "conv_all", 0.99, X, scope="global").kept == first.kept


def test_a_block_that_mixes_heads_is_refused_by_the_check_not_pruned_wrong():
    with pytest.raises(PruningError, match=r"pruning heads of attn changed what the model computes .*exclude"):
        prune_channels(block(HeadsAndTokensMixed()), "conv_all", 0.5, X, scope="layer")
    # excluded, it stays whole and the rest prunes
    result = prune_channels(block(HeadsAndTokensMixed()), "conv_all", 0.5, X, scope="layer", exclude=["attn"])
    assert result.model.attn.num_heads == 4 and result.model.fc1.out_features == 16


def test_a_gate_computed_from_the_input_leaves_the_heads_whole_with_the_reason():
    result = prune_channels(block(Gated()), "conv_all", 0.5, X, scope="layer")
    assert result.model.attn.num_heads == 4
    assert "attn_gate mixes in the output of attn.gate" in result.graph.why_unprunable()["attn.qkv"]


def test_attention_none_leaves_heads_whole_and_says_so():
    result = prune_channels(block(), "conv_all", 0.5, X, scope="layer", attention="none")
    assert result.model.attn.num_heads == 4
    assert "attention='none'" in result.graph.why_unprunable()["attn.qkv"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"attention": "rows"}, r"^unknown attention mode 'rows'; choose one of: heads, head_dim, none$"),
        (
            {"attention": "head_dim", "round_to": 6},
            r"^attn: head_dim 6 has no multiple of round_to 6 below it, so none of its dims can go; choose a round_to "
            r"below 6, or attention='heads'$",
        ),
    ],
)
def test_bad_attention_options_get_one_line_naming_the_block(options, message):
    with pytest.raises(PruningError, match=message):
        prune_channels(block(), "conv_all", 0.5, X, scope="layer", **options)


def test_round_to_in_head_dim_mode_rounds_the_dims_kept_and_spares_blocks_not_pruned():
    result = prune_channels(block(), "conv_all", 0.5, X, scope="layer", attention="head_dim", round_to=4)
    assert result.model.attn.head_dim == 4  # 3 kept, rounded up to 4
    for spared in ({"sparsity": {"fc1": 0.5}}, {"sparsity": 0.5, "exclude": ["attn"]}):
        kwargs = {"scope": "layer", **spared} if "exclude" in spared else spared
        assert prune_channels(block(), "conv_all", example_input=X, attention="head_dim", round_to=6, **kwargs).kept


def test_global_scope_takes_floor_of_each_blocks_heads_times_the_ratio():
    """A head's score sums all its weights: pooled with channels', no head would ever go."""
    result = prune_channels(block(), "conv_all", 0.5, X, scope="global")
    assert result.heads == {"attn": 2} and result.model.fc1.out_features < 32


class TwoBlocks(nn.Module):
    def __init__(self, second: nn.Module) -> None:
        super().__init__()
        self.first, self.second, self.head = Attention(), second, nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.first(x)
        x = x + self.second(x)
        return self.head(x.mean(1))


def test_the_check_names_only_the_block_that_mixes_heads():
    torch.manual_seed(0)
    with pytest.raises(PruningError, match=r"pruning heads of second changed .*\(exclude=\['second'\]"):
        prune_channels(TwoBlocks(HeadsAndTokensMixed()).eval(), "conv_all", 0.5, X, scope="layer")


def test_timm_style_qk_norm_keeps_whole_heads_prunable_and_the_model_the_root():
    class QkNormed(Attention):
        """timm's qk_norm: a LayerNorm over head_dim on q and k, traced through as F.layer_norm."""

        def __init__(self) -> None:
            super().__init__()
            self.q_norm, self.k_norm = timm_layer_norm(6), timm_layer_norm(6)

        def attend(self, x: torch.Tensor) -> torch.Tensor:
            B, N, _ = x.shape
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
            return self.merged(x, B, N)

    torch.manual_seed(0)
    model = QkNormed().eval()  # the attention module is the whole model
    with torch.no_grad():
        for norm in (model.q_norm, model.k_norm):
            norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    result = prune_channels(model, "conv_all", {"qkv": 0.5}, X)
    assert result.heads == {"": 2} and result.model.num_heads == 2
    with torch.no_grad():
        assert relative_error(result.model(X), consumer_zeroed_reference(model, result.kept, X)) < 1e-5
    assert "not known to keep heads apart" in analyze(model, X, "head_dim").why_unprunable()["qkv"]


def timm_layer_norm(width: int) -> nn.Module:
    class LayerNorm(nn.LayerNorm):  # timm's: F.layer_norm in its own forward
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    return LayerNorm(width)


def test_channel_tools_and_other_backends_leave_heads_to_scratch():
    """NNI's dependency sets and mask fixing are over channels, Torch-Pruning cuts channels: qkv stays whole there."""
    from algorithms import ChannelDependency, fix_mask_conflict
    from backends.budget import plan_budget, unit_norms

    model = block()
    assert "attention='none'" in ChannelDependency(model, X).graph.why_unprunable()["attn.qkv"]
    masks = {"attn.qkv": {"weight": torch.ones(72, 16), "bias": torch.ones(72)}}
    masks["attn.qkv"]["weight"][:10] = 0
    assert fix_mask_conflict(masks, model, X)["attn.qkv"]["weight"].shape == (72, 16)
    pytest.importorskip("torch_pruning")
    assert "attn.qkv" not in get_backend("tp").prunable_layers(model, "l1", X)
    budget = plan_budget(get_backend("scratch"), model, "conv_all", X, round_to=8)
    heads = budget.graph.group_of_producer["attn.qkv"]
    assert budget.groups.sizes[heads] == 4 and budget.groups.steps[heads] == 1 and len(unit_norms(budget)[heads]) == 4


@pytest.mark.parametrize("attention", ["heads", "head_dim"])
def test_the_cost_model_scales_attention_macs_with_the_heads_kept(attention):
    from algorithms.cost import CostModel
    from tests.helpers import _group_units

    model = block(Attention(fused=False))  # unfused: the flop counter sees q.k and weights.v as matmuls
    result = prune_channels(model, "conv_all", 0.5, X, scope="layer", attention=attention)
    cost = CostModel.of(model, X, result.graph)
    assert sum(cost.attention_macs.values()) == 2 * 5 * 5 * 4 * 6  # q.k and weights.v: tokens^2 x heads x head_dim
    plan = {result.graph.group_of_producer[p]: len(_group_units(result.graph, p, k)) for p, k in result.kept.items()}
    actual = CostModel.of(result.model, X, analyze(result.model, X, attention)).costs({})
    assert cost.costs(plan) == pytest.approx(actual)


def test_the_activation_ranking_prunes_channels_too_by_what_flows_not_by_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    with torch.no_grad():  # channel 5: the largest filter, silenced by its BatchNorm
        model[0].weight[5] *= 100
        model[1].weight[5], model[1].bias[5] = 0.0, 0.0
    x = torch.randn(4, 3, 32, 32)
    assert 5 in get_backend("scratch").prune(model.eval(), "conv_all", {"0": 0.125}, x).kept["0"]
    result = get_backend("scratch").prune(model.eval(), "activation", {"0": 0.125}, x)
    assert 5 not in result.kept["0"] and len(result.kept["0"]) == 7
    with torch.no_grad():
        assert relative_error(result.model(x), consumer_zeroed_reference(model, result.kept, x)) < 1e-5


# -- timm's transformers -----------------------------------------------------------------------------------------------
timm = pytest.importorskip("timm")

TRANSFORMERS = {
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8},
    "deit_tiny_patch16_224": {"img_size": 32, "patch_size": 8},
    "swin_tiny_patch4_window7_224": {"img_size": 56, "window_size": 7},
}


def transformer(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **TRANSFORMERS[name]).eval()
    size = TRANSFORMERS[name]["img_size"]
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(TRANSFORMERS))
@pytest.mark.parametrize("attention", ["heads", "head_dim"])
def test_timm_transformers_prune_heads_and_mlp_units_exactly_with_no_settings(name, attention):
    model, x = transformer(name)
    result = get_backend("scratch").prune(model, "conv_all", 0.5, x, scope="layer", attention=attention)
    assert result.info["why_unprunable"] == {}  # the embedding width (class token, position embedding) prunes too
    blocks = [m for m in result.model.modules() if hasattr(m, "num_heads") and hasattr(m, "qkv")]
    before = [m for m in model.modules() if hasattr(m, "num_heads") and hasattr(m, "qkv")]
    assert len(result.info["heads"]["kept"]) == len(blocks) >= 12
    for pruned, original in zip(blocks, before, strict=True):
        heads, head_dim = original.num_heads, original.qkv.out_features // 3 // original.num_heads
        if attention == "heads":  # floor(heads / 2) go: 3 keep 2, Swin's 6 / 12 / 24 keep half
            heads -= heads // 2
        else:
            head_dim //= 2
        assert (
            pruned.num_heads == heads and pruned.qkv.out_features == 3 * pruned.proj.in_features == 3 * heads * head_dim
        )
    mlp = [m for n, m in result.model.named_modules() if n.endswith("mlp.fc1")]
    original = [m for n, m in model.named_modules() if n.endswith("mlp.fc1")]
    assert all(p.out_features == o.out_features // 2 for p, o in zip(mlp, original, strict=True))
    with torch.no_grad():
        assert relative_error(result.model(x), consumer_zeroed_reference(model, result.kept, x, attention)) < 1e-5


def test_swin_slices_its_relative_position_bias_table_with_the_heads_and_prunes_its_streams():
    model, x = transformer("swin_tiny_patch4_window7_224")
    result = get_backend("scratch").prune(model, "conv_all", 0.5, x, scope="layer")
    assert result.info["why_unprunable"] == {}  # shifted windows, patch merging: every stream prunes too
    assert sum(p.numel() for p in result.model.parameters()) < 0.26 * sum(p.numel() for p in model.parameters())
    pruned = result.model
    table = model.layers[2].blocks[0].attn.relative_position_bias_table
    attention = pruned.layers[2].blocks[0].attn
    assert table.shape[1] == 12 and attention.num_heads == 6
    assert attention.relative_position_bias_table.shape == (table.shape[0], 6)


def test_efficientformer_prunes_its_heads_and_every_channel_exactly_where_torch_pruning_fails():
    torch.manual_seed(0)
    model = timm.create_model("efficientformer_l1", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    result = get_backend("scratch").prune(model, "conv_all", 0.5, x, scope="layer")
    assert result.info["why_unprunable"] == {} and result.info["heads"]["kept"] == {"stages.3.blocks.4.token_mixer": 4}
    assert sum(p.numel() for p in result.model.parameters()) < 0.26 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert relative_error(result.model(x), consumer_zeroed_reference(model, result.kept, x)) < 1e-5
    pytest.importorskip("torch_pruning")
    with pytest.raises(PruningError, match="IndexError"):
        get_backend("tp").prune(model, "l1", 0.5, x, scope="layer")


def test_torch_pruning_s_own_pruned_transformers_do_not_run():
    pytest.importorskip("torch_pruning")
    for name in ("deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"):
        model, x = transformer(name)
        with pytest.raises(PruningError, match="no longer runs"):
            get_backend("tp").prune(model, "l1", 0.5, x[:1], scope="layer")
