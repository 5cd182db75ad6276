import pytest
import torch

from backends import get_backend
from models import build_model
from pipeline import snapshots
from pipeline.errors import UsageError
from pipeline.snapshots import load_model, load_snapshot, rebuild_model, save_snapshot

META = {"model": "resnet", "data_type": "digits", "input_shape": [1, 32, 32], "num_classes": 10}


def test_round_trip_gives_identical_outputs(tmp_path):
    model = build_model("resnet", (1, 32, 32), 10).eval()
    save_snapshot(tmp_path / "model_base", model, META)
    loaded, meta = load_model(tmp_path / "model_base", "resnet", "digits")
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
    assert meta == META


def test_pruned_snapshot_is_rebuilt_from_shapes_alone(tmp_path):
    model = build_model("resnet", (1, 32, 32), 10).eval()
    x = torch.randn(3, 1, 32, 32)
    pruned = get_backend("scratch").prune(model, "conv_all", 0.5, x, scope="layer").model.eval()
    save_snapshot(tmp_path / "model_prune", pruned, META)
    assert "torch.nn" not in (tmp_path / "model_prune" / "meta.json").read_text()
    state_dict, meta = load_snapshot(tmp_path / "model_prune")  # weights_only=True inside
    rebuilt = rebuild_model(state_dict, meta).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), pruned(x))
    assert rebuilt.layer4[1].conv1.out_channels == pruned.layer4[1].conv1.out_channels < 512


def test_interrupted_save_leaves_the_previous_snapshot_intact(tmp_path, monkeypatch):
    model = build_model("lenet", (1, 32, 32), 10)
    save_snapshot(tmp_path / "model_base", model, {**META, "model": "lenet", "version": 1})

    def dies(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(snapshots.torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        save_snapshot(tmp_path / "model_base", model, {**META, "model": "lenet", "version": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["model_base"]  # no temporary directory left
    assert load_snapshot(tmp_path / "model_base")[1]["version"] == 1


def test_wrong_or_missing_snapshot_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no snapshot in"):
        load_snapshot(tmp_path / "model_base")
    save_snapshot(tmp_path / "model_base", build_model("lenet", (1, 32, 32), 10), {**META, "model": "lenet"})
    with pytest.raises(UsageError, match="is of model 'lenet', not 'vgg'"):
        load_model(tmp_path / "model_base", "vgg", "digits")
