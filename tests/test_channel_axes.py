"""Channels that move: permutes to channels-last, LayerNorm and layer scale, Linear on tokens, channel shuffles, chunks
(#11)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.shufflenetv2 import channel_shuffle

from algorithms import SensitivityAnalysis
from algorithms.graph import analyze
from algorithms.modules import resize_to_state_dict
from backends import get_backend
from tests.helpers import consumer_zeroed_reference, relative_error

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def randomize_layer_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """LayerNorm weights of one and biases of zero would hide a slicing error: give them random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
    return model


class ConvNeXtLike(nn.Module):
    """A stem, one ConvNeXt block (depthwise conv, channels-last LayerNorm + MLP, layer scale, residual) and a
    LayerNorm2d head."""

    def __init__(self, to_channels_last: str = "permute") -> None:
        super().__init__()
        self.to_channels_last = to_channels_last
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.norm = nn.LayerNorm(16)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.layer_scale = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.head_norm = LayerNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x)
        # (N, H, W, C) or (N, W, H, C)
        y = y.permute(0, 2, 3, 1) if self.to_channels_last == "permute" else y.transpose(1, 3)
        y = self.down(F.gelu(self.up(self.norm(y))))
        y = y.permute(0, 3, 1, 2) if self.to_channels_last == "permute" else y.transpose(1, 3)
        x = x + self.layer_scale * y
        return self.head(self.head_norm(x).mean((2, 3)))


def prune(model: nn.Module, x: torch.Tensor = X, ratio: float = 0.5):
    return get_backend("scratch").prune(model.eval(), "conv_all", ratio, x, scope="layer")


def assert_exact(model: nn.Module, result, x: torch.Tensor = X) -> None:
    with torch.no_grad():
        assert relative_error(result.model(x), consumer_zeroed_reference(model, result.kept, x)) < 1e-5


@pytest.mark.parametrize("to_channels_last", ["permute", "transpose"])
def test_a_channels_last_block_prunes_its_stream_and_hidden_units_exactly(to_channels_last):
    torch.manual_seed(0)
    model = randomize_layer_norms(ConvNeXtLike(to_channels_last)).eval()
    graph = analyze(model, X)
    stream = graph.group("stem")
    assert stream.members == ["stem", "down"] and stream.prunable and stream.layer_norms == ["norm", "head_norm"]
    assert graph.group("up").prunable and graph.group("up").layer_norms == []
    result = prune(model)
    assert set(result.kept) == {"stem", "down", "up"} and result.kept["stem"] == result.kept["down"]
    pruned = result.model
    assert (
        pruned.norm.normalized_shape == (8,)
        and pruned.head_norm.normalized_shape == (8,)
        and pruned.head_norm.weight.shape == (8,)
    )
    assert (
        pruned.layer_scale.shape == (8, 1, 1)
        and pruned.dw.groups == 8
        and pruned.up.in_features == 8
        and pruned.down.in_features == 16
    )
    assert torch.equal(pruned.layer_scale, model.layer_scale[result.kept["stem"]])
    assert_exact(model, result)  # LayerNorms normalise over the kept channels: the reference does the same


def test_pruning_under_a_layer_norm_changes_its_statistics():
    """Why the reference renormalises: zeroing channels is not what the pruned LayerNorm computes (README, 'what
    differs')."""
    torch.manual_seed(0)
    model = randomize_layer_norms(ConvNeXtLike()).eval()
    result = prune(model)
    kept = torch.as_tensor(result.kept["stem"])
    with torch.no_grad():
        stream = model.stem(X).permute(0, 2, 3, 1)
        zeroed = stream * torch.isin(torch.arange(16), kept)
        over_kept = F.layer_norm(stream[..., kept], (8,), model.norm.weight[kept], model.norm.bias[kept])
        assert torch.allclose(result.model.norm(stream[..., kept]), over_kept, atol=1e-6)
        assert not torch.allclose(model.norm(zeroed)[..., kept], over_kept, atol=1e-2)


def test_a_pruned_channels_last_model_rebuilds_from_its_state_dict_alone():
    torch.manual_seed(0)
    model = randomize_layer_norms(ConvNeXtLike()).eval()
    pruned = prune(model).model
    rebuilt = resize_to_state_dict(ConvNeXtLike(), pruned.state_dict())
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(X), pruned(X))


class ScaledInput(ConvNeXtLike):
    """Something upstream of the stem, so the stream unit (stem+down) has values to reuse; a unit at the input runs
    whole."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * 0.5)


def test_sensitivity_reuse_stays_exact_when_a_layer_scale_changes():
    torch.manual_seed(0)
    model = randomize_layer_norms(ScaledInput()).eval()

    def metric(candidate: nn.Module) -> float:
        with torch.no_grad():
            return float(candidate(X).double().sum())

    results = [
        SensitivityAnalysis(model, metric, sparsities=[0.25, 0.5], reuse_upstream=reuse, progress=False)
        for reuse in (True, False)
    ]
    fast, plain = (analysis.analysis(val_args=[model]) for analysis in results)
    assert fast == plain and set(fast) == {"stem+down", "up"}
    # each unit's second sparsity ran its downstream part (the sliced LayerNorm2d and layer scale) from the cache, not a
    # fallback
    assert results[0].cache_hits == 2


class TokenMLP(nn.Module):
    """A transformer MLP on (N, tokens, features) with a residual and a final LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.up, self.down = nn.Linear(12, 16), nn.Linear(16, 40), nn.Linear(40, 16)
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.down(F.gelu(self.up(x)))
        return self.head(self.norm(x)[:, 0])


def test_linear_layers_on_tokens_prune_their_features():
    torch.manual_seed(0)
    model = randomize_layer_norms(TokenMLP()).eval()
    tokens = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(1))
    result = prune(model, tokens)
    assert set(result.kept) == {"embed", "down", "up"} and len(result.kept["up"]) == 20
    assert result.model.up.out_features == 20 and result.model.norm.normalized_shape == (8,)
    assert_exact(model, result, tokens)


def test_a_linear_over_a_spatial_axis_keeps_the_channels_it_passes_through():
    class LinearOverWidth(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.over_width, self.head = nn.Conv2d(3, 8, 1), nn.Linear(16, 6), nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(F.relu(self.over_width(self.a(x))).mean((1, 2)))

    model = LinearOverWidth().eval()
    graph = analyze(model, X)
    assert "last axis that carries no tracked channels" in graph.group("a").blocked_by[0]
    result = prune(model)
    assert set(result.kept) == {"over_width"}
    assert_exact(model, result)


def test_a_small_vision_transformer_prunes_its_mlp_hidden_units_exactly():
    torch.manual_seed(0)
    model = randomize_layer_norms(
        torchvision.models.VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=4)
    )
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = prune(model, x)
    hidden = [f"encoder.layers.encoder_layer_{i}.mlp.0" for i in range(2)]
    assert sorted(result.kept) == hidden and all(len(result.kept[name]) == 32 for name in hidden)
    assert result.model.encoder.layers[0].mlp[3].in_features == 32
    # the class token joins the stream (sliced with it), but nn.MultiheadAttention reads the stream whole
    assert any("(MultiheadAttention)" in reason for reason in result.info["why_unprunable"].values())
    assert_exact(model, result, x)


class Shuffled(nn.Module):
    """Two branches concatenated, then ShuffleNet's channel shuffle (view, transpose, view) into one conv."""

    def __init__(self, shuffle: bool = True) -> None:
        super().__init__()
        self.shuffle = shuffle
        self.a, self.b, self.c, self.head = (
            nn.Conv2d(3, 8, 1),
            nn.Conv2d(3, 8, 1),
            nn.Conv2d(16, 8, 3, padding=1),
            nn.Linear(8, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], 1)
        return self.head(self.c(channel_shuffle(y, 2) if self.shuffle else y).mean((2, 3)))


def test_a_channel_shuffle_couples_its_groups_and_prunes_exactly():
    torch.manual_seed(0)
    model = Shuffled().eval()
    graph = analyze(model, X)
    # the interleaved groups keep the same channels
    assert graph.group("a") is graph.group("b") and graph.group("a").prunable
    consumer = next(c for c in graph.consumers if c.module == "c")
    assert [(s.size, s.repeat) for s in consumer.layout] == [(8, 2)]  # channel k of the pair is columns 2k and 2k + 1
    result = prune(model)
    assert result.kept["a"] == result.kept["b"] and result.model.c.in_channels == 8
    assert_exact(model, result)
    assert analyze(Shuffled(shuffle=False).eval(), X).group("a") is not analyze(
        Shuffled(shuffle=False).eval(), X
    ).group("b")


class Chunked(nn.Module):
    def __init__(self, cut_inside: bool = False) -> None:
        super().__init__()
        self.cut_inside = cut_inside
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.c, self.d, self.head = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 1), nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cut_inside:
            # four channels of `a` each: its channels cannot be chosen freely
            first, second = F.relu(self.a(x)).chunk(2, dim=1)
            y = torch.cat([self.c(torch.cat([first, second], 1)), self.d(F.relu(self.b(x)))], 1)
        else:
            first, second = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1).chunk(2, dim=1)
            y = torch.cat([self.c(second), self.d(first)], 1)
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("sparsity, scope", [(0.5, "layer"), ({"a": 0.5, "b": 0.25}, "layer"), (0.5, "global")])
def test_a_chunk_on_layer_boundaries_keeps_its_pieces_equal(sparsity, scope):
    """A pruned chunk(2) splits at half its own width: both pieces must keep as many channels, so they prune as one
    group."""
    torch.manual_seed(0)
    model = Chunked().eval()
    result = get_backend("scratch").prune(model, "conv_all", sparsity, X, scope=scope)
    assert result.kept["a"] == result.kept["b"] and result.model.c.in_channels == result.model.d.in_channels == len(
        result.kept["a"]
    )
    assert_exact(model, result)


def test_a_chunk_through_a_layer_blocks_it_and_says_so():
    model = Chunked(cut_inside=True).eval()
    result = prune(model)
    assert "a" not in result.kept and "b" in result.kept
    assert "split that cuts through a layer's channels" in result.info["why_unprunable"]["a"]
    assert_exact(model, result)


def test_a_layer_scale_read_twice_blocks_its_channels():
    class SharedScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c, self.head = (
                nn.Conv2d(3, 8, 1),
                nn.Conv2d(3, 8, 1),
                nn.Conv2d(8, 6, 1),
                nn.Linear(12, 4),
            )
            self.scale = nn.Parameter(torch.rand(8, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.cat([self.c(self.scale * self.a(x)), self.c_two(self.scale * self.b(x))], 1)
            return self.head(y.mean((2, 3)))

        def c_two(self, y: torch.Tensor) -> torch.Tensor:
            return y[:, :6]

    model = SharedScale().eval()
    graph = analyze(model, X)
    assert not graph.group("a").prunable and "per-channel constant" in graph.group("a").blocked_by[0]
    assert_exact(model, prune(model))


class Probe(nn.Module):
    """conv `a` -> an op under test -> Linear `fc` -> classifier: `a` prunes exactly when the op is understood."""

    def __init__(self, op, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.op = op
        self.a, self.fc, self.head = nn.Conv2d(3, 8, 1), nn.Linear(8, 6), nn.Linear(6, 4)
        self.ln = norm if norm is not None else nn.LayerNorm(8)
        self.w = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(self.op(self, F.relu(self.a(x))))))


class KeepsItsOwnLayerNorm(nn.LayerNorm):
    """A LayerNorm subclass nobody here wrote: fx traces through it to F.layer_norm."""


BLOCKED = {
    "max_pool2d on (N, C, L)": (lambda m, y: F.max_pool2d(y.flatten(2), (3, 1), 1, (1, 0)).mean(2), "max_pool2d"),
    "AvgPool2d on (N, C, L)": (
        lambda m, y: nn.functional.avg_pool2d(y.flatten(2), (3, 1), 1, (1, 0)).mean(2),
        "avg_pool2d",
    ),
    "split into fixed sizes": (
        lambda m, y: torch.cat(torch.split(y, [5, 3], dim=1)[::-1], 1).mean((2, 3)),
        "sizes fixed in forward",
    ),
    "LayerNorm weight read elsewhere": (
        lambda m, y: m.ln(y.permute(0, 2, 3, 1)).mean((1, 2)) * m.ln.weight.mean(),
        "also read directly",
    ),
    "conv bias read elsewhere": (lambda m, y: (y * m.a.bias.view(1, -1, 1, 1)).mean((2, 3)), "also read directly"),
    "layer_norm with a model parameter": (
        lambda m, y: F.layer_norm(y.permute(0, 2, 3, 1), (8,), m.w).mean((1, 2)),
        "layer_norm",
    ),
    "layer_norm outside its module": (
        lambda m, y: F.layer_norm(y.permute(0, 2, 3, 1), m.ln.normalized_shape, m.ln.weight, m.ln.bias).mean((1, 2)),
        "layer_norm",
    ),
    "layer_norm with a computed shape": (
        lambda m, y: F.layer_norm(y.permute(0, 2, 3, 1), y.shape[1:2], m.ln.weight).mean((1, 2)),
        "layer_norm",
    ),
    "LayerNorm without weights": (
        lambda m, y: nn.LayerNorm(8, elementwise_affine=False)(y.permute(0, 2, 3, 1)).mean((1, 2)),
        None,
    ),
    "permute with a computed dim": (lambda m, y: y.permute([0, 2, 3, y.dim() - 3]).mean((1, 2)), "permute"),
    "mean over dims computed in forward": (lambda m, y: y.mean(dim=(2, y.dim() - 1)), "reduction"),
}


@pytest.mark.parametrize("case", BLOCKED)
def test_ops_that_cannot_follow_the_channels_block_them_and_say_which(case):
    op, reason = BLOCKED[case]
    model = Probe(op).eval()
    if case == "LayerNorm without weights":
        model.op = lambda m, y: m.bare(y.permute(0, 2, 3, 1)).mean((1, 2))
        model.bare = nn.LayerNorm(8, elementwise_affine=False)
        reason = "without elementwise weights"
    result = prune(model)
    assert "a" not in result.kept and "fc" in result.kept
    assert reason in result.info["why_unprunable"]["a"]
    assert_exact(model, result)


UNDERSTOOD = {
    "transpose(1, dim1=3)": lambda m, y: y.transpose(1, dim1=3).mean((1, 2)),
    "swapaxes(axis0=1, axis1=-1)": lambda m, y: y.swapaxes(axis0=1, axis1=-1).mean((1, 2)),
    "torch.permute(dims=...)": lambda m, y: torch.permute(y, dims=(0, 3, 2, 1)).mean((1, 2)),
    "a LayerNorm subclass, channels-last": lambda m, y: m.ln(y.permute(0, 2, 3, 1)).mean((1, 2)),
    "view (N, C) as (N, 1, C)": lambda m, y: y.mean((2, 3)).view(y.shape[0], 1, -1)[:, 0],
}


@pytest.mark.parametrize("case", UNDERSTOOD)
def test_ops_that_move_the_channel_axis_keep_it_prunable(case):
    torch.manual_seed(0)
    model = randomize_layer_norms(Probe(UNDERSTOOD[case], KeepsItsOwnLayerNorm(8))).eval()
    result = prune(model)
    assert "a" in result.kept and not result.info["why_unprunable"]
    assert_exact(model, result)


def test_multi_head_attention_is_named_as_the_op_it_does_not_understand():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.attn, self.up, self.down, self.head = (
                nn.Linear(12, 16),
                nn.MultiheadAttention(16, 2, batch_first=True),
                nn.Linear(16, 32),
                nn.Linear(32, 16),
                nn.Linear(16, 4),
            )

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.embed(tokens)
            x = x + self.attn(x, x, x, need_weights=False)[0]
            x = x + self.down(F.gelu(self.up(x)))
            return self.head(x.mean(1))

    model = Attention().eval()
    tokens = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1))
    result = prune(model, tokens)
    assert set(result.kept) == {"up"}
    assert set(result.info["why_unprunable"]) == {"embed+down"}  # the residual stream, blamed on the op that stops it
    assert result.info["why_unprunable"]["embed+down"].startswith("module attn (MultiheadAttention) (attn)")
    assert_exact(model, result, tokens)


def test_nni_leaves_channels_it_cannot_follow_whole():
    pytest.importorskip("nni")
    torch.manual_seed(0)
    model = Shuffled().eval()
    result = get_backend("nni").prune(model, "l1", 0.5, X, scope="layer")
    assert set(result.kept) == {"c"}  # `a` and `b` are coupled by the shuffle, which NNI's dependency groups do not see
    assert_exact(model, result)


def test_sensitivity_reuse_falls_back_when_a_later_variant_cannot_reuse():
    """The first variant prunes nothing (2 channels at 0.25); the next breaks a size the graph baked in: plain forwards,
    same numbers."""

    class BakedWidth(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 2, 1), nn.Linear(2, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x * 0.5  # something upstream of `a`, so its unit uses the cache
            return self.fc(F.relu(self.a(x)).mean((2, 3)).view(-1, self.fc.in_features))

    torch.manual_seed(0)
    model = BakedWidth().eval()

    def metric(candidate: nn.Module) -> float:
        with torch.no_grad():
            return float(candidate(X).double().sum())

    analyses = [
        SensitivityAnalysis(
            model, metric, sparsities=[0.25, 0.5], reuse_upstream=reuse, example_input=X[:1], progress=False
        )
        for reuse in (True, False)
    ]
    results = [analysis.analysis(val_args=[model]) for analysis in analyses]
    assert results[0] == results[1]
    # the 0.25 variant ran from the recorded values; the 0.5 one fell back to the plain forward
    assert analyses[0].cache_hits == 1
