import errno
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import ofrecordMake
import run
from pipeline.data import ofrecord_convert
from pipeline.data.datasets import load_dataset
from pipeline.data.ofrecord_convert import convert_json_dataset
from pipeline.data.ofrecord_dataset import load_ofrecord_dataset
from pipeline.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


# --- an independent wire-format encoder/decoder, so a bug shared by our writer and reader cannot hide ---
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def hand_record(pixels: list[float], label: int) -> bytes:
    float_list = _field(1, struct.pack(f"<{len(pixels)}f", *pixels))  # FloatList.value, packed
    int32_list = _field(1, _varint(label))  # Int32List.value, packed
    images = _field(1, b"images") + _field(2, _field(2, float_list))  # map entry: key, value=Feature{float_list=2}
    labels = _field(1, b"labels") + _field(2, _field(4, int32_list))  # Feature{int32_list=4}
    return _field(1, images) + _field(1, labels)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        assert key & 7 == 2, "every field here is length-delimited"
        length, pos = _read_varint(data, pos)
        out.append((key >> 3, data[pos : pos + length]))
        pos += length
    return out


def hand_decode_part(path: Path) -> list[tuple[list[float], int]]:
    data, pos, records = path.read_bytes(), 0, []
    while pos < len(data):
        (length,) = struct.unpack_from("<q", data, pos)
        entries = {}
        for _, entry in _fields(data[pos + 8 : pos + 8 + length]):
            (_, key), (_, feature) = _fields(entry)
            entries[key] = _fields(feature)[0]
        (kind, float_list), (label_kind, int32_list) = entries[b"images"], entries[b"labels"]
        assert kind == 2 and label_kind == 4
        payload = _fields(float_list)[0][1]
        records.append(
            (list(struct.unpack(f"<{len(payload) // 4}f", payload)), _read_varint(_fields(int32_list)[0][1], 0)[0])
        )
        pos += 8 + length
    return records


def write_json_dataset(root: Path, name: str, train: dict, test: dict) -> Path:
    folder = root / "myData" / name
    folder.mkdir(parents=True)
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "test.json").write_text(json.dumps(test))
    return folder


def sample(n: int, shape=(3, 4, 4), seed=0, classes=3) -> dict:
    rng = np.random.default_rng(seed)
    data = (rng.integers(0, 511, (n, int(np.prod(shape)))) / 2).tolist()  # halves: exact in float32
    return {"data": data, "label": [i % classes for i in range(n)], "shape": list(shape)}


def test_json_to_ofrecord_to_tensors_round_trips_exactly(tmp_path):
    train, test = sample(7), sample(5, seed=1)
    del test["shape"]
    write_json_dataset(tmp_path, "toy", train, test)
    target = convert_json_dataset("toy", tmp_path / "myData", tmp_path / "ofData", part_num=3)
    assert sorted(p.name for p in (target / "train").iterdir()) == ["part-00000", "part-00001", "part-00002"]
    data = load_ofrecord_dataset(target, "toy")
    assert torch.equal(data.train_images.reshape(7, -1), torch.tensor(train["data"], dtype=torch.float32))
    assert data.train_labels.tolist() == train["label"] and data.test_labels.tolist() == test["label"]
    assert torch.equal(data.test_images.reshape(5, -1), torch.tensor(test["data"], dtype=torch.float32))
    decoded = [r for part in sorted((target / "train").iterdir()) for r in hand_decode_part(part)]
    assert [r[0] for r in decoded] == train["data"] and [r[1] for r in decoded] == train["label"]
    meta = json.loads((target / "meta.json").read_text())
    everything = np.array(train["data"] + test["data"]).reshape(12, 3, -1).transpose(1, 0, 2).reshape(3, -1)
    assert meta["num_classes"] == 3 and meta["image_shape"] == [3, 4, 4]
    assert meta["num_examples"] == 7 and meta["num_val_examples"] == 5
    assert np.allclose(meta["rgb_mean"], everything.mean(1), atol=1e-4) and np.allclose(
        meta["rgb_std"], everything.std(1), atol=1e-4
    )


def test_parallel_conversion_writes_the_same_bytes_as_one_process(tmp_path, monkeypatch):
    """Workers encode chunks out of order; the parts must still be byte-identical and in row order."""
    monkeypatch.setattr(ofrecord_convert, "BATCH_ROWS", 2)
    monkeypatch.setattr(ofrecord_convert, "PARALLEL_FROM", 0)
    rng = np.random.default_rng(5)
    train = {
        "data": rng.integers(0, 256, (11, 12)).tolist(),
        "label": rng.integers(0, 4, 11).tolist(),
        "shape": [3, 2, 2],
    }
    test = {"data": rng.integers(0, 256, (4, 12)).tolist(), "label": [0, 1, 2, 3]}
    write_json_dataset(tmp_path, "ints", train, test)
    serial = convert_json_dataset("ints", tmp_path / "myData", tmp_path / "serial", part_num=3, workers=1)
    parallel = convert_json_dataset("ints", tmp_path / "myData", tmp_path / "parallel", part_num=3, workers=2)
    files = sorted(str(p.relative_to(serial)) for p in serial.rglob("*"))
    assert files == sorted(str(p.relative_to(parallel)) for p in parallel.rglob("*")), (
        "no chunk files may be left behind"
    )
    assert len([f for f in files if "part-" in f]) == 6
    for name in files:
        if (serial / name).is_file():
            assert (serial / name).read_bytes() == (parallel / name).read_bytes(), name
    decoded = [r for part in sorted((parallel / "train").iterdir()) for r in hand_decode_part(part)]
    assert [r[0] for r in decoded] == train["data"] and [r[1] for r in decoded] == train["label"]
    train["data"][9][4] = 300
    write_json_dataset(tmp_path, "bad", train, test)
    with pytest.raises(UsageError, match=r"train.json: data row 9, value 4: 300 is outside 0..255"):
        convert_json_dataset("bad", tmp_path / "myData", tmp_path / "parallel", workers=2)
    assert not (tmp_path / "parallel" / "bad").exists() and [p.name for p in (tmp_path / "parallel").iterdir()] == [
        "ints"
    ]


@pytest.mark.parametrize("kernel_copy", ["works", "missing", "fails_half_way"])
def test_chunks_append_exactly_whatever_copy_file_range_does(tmp_path, monkeypatch, kernel_copy):
    payload = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    real = os.copy_file_range
    if kernel_copy == "missing":
        monkeypatch.delattr(os, "copy_file_range")
    elif kernel_copy == "fails_half_way":
        calls = []

        def flaky(source: int, target: int, count: int) -> int:
            calls.append(count)
            if len(calls) > 1:
                raise OSError(errno.EXDEV, "cross-device")
            return real(source, target, 1000)

        monkeypatch.setattr(os, "copy_file_range", flaky)
    chunk, part = tmp_path / "chunk", tmp_path / "part"
    chunk.write_bytes(payload)
    with part.open("wb") as handle:
        handle.write(b"head")
        ofrecord_convert._append_file(chunk, handle)
        handle.write(b"tail")
    assert part.read_bytes() == b"head" + payload + b"tail" and not chunk.exists()


def test_hand_built_ofrecord_bytes_are_read(tmp_path):
    rng = np.random.default_rng(3)
    rows = {
        split: [(rng.integers(0, 256, 12).astype(float).tolist(), int(rng.integers(0, 2))) for _ in range(3)]
        for split in ("train", "test")
    }
    for split, records in rows.items():
        (tmp_path / split).mkdir()
        blob = b"".join(struct.pack("<q", len(r)) + r for r in (hand_record(p, label) for p, label in records))
        (tmp_path / split / "part-00000").write_bytes(blob)
    meta = {
        "num_classes": 2,
        "image_shape": [3, 2, 2],
        "rgb_mean": [1, 2, 3],
        "rgb_std": [4, 5, 6],
        "num_examples": 3,
        "num_val_examples": 3,
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    data = load_ofrecord_dataset(tmp_path, "hand")
    assert data.train_images.reshape(3, -1).tolist() == [p for p, _ in rows["train"]]
    assert data.test_labels.tolist() == [label for _, label in rows["test"]]
    assert data.mean == (1.0, 2.0, 3.0) and data.input_shape == (3, 2, 2)


def test_shipped_example_converts_and_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "myData").symlink_to(ROOT / "myData")
    assert ofrecordMake.main(["--dataName", "randomData255"]) == 0
    assert "wrote ofData/randomData255 (4 records" in capsys.readouterr().out
    meta = json.loads((tmp_path / "ofData/randomData255/meta.json").read_text())
    assert meta["image_shape"] == [3, 32, 32] and meta["num_examples"] == 2 and meta["num_val_examples"] == 2
    assert run.main(["--data_type", "randomData255", "--num_epochs", "1"]) == 0


def test_run_py_resolves_builtin_then_ofdata_then_mydata(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_json_dataset(
        tmp_path, "fresh", sample(6, (1, 16, 16)), {"data": sample(2, (1, 16, 16))["data"], "label": [0, 1]}
    )
    data = load_dataset("fresh")  # not converted yet: myData/fresh is converted first
    assert (tmp_path / "ofData/fresh/meta.json").is_file() and data.input_shape == (1, 16, 16)
    # the source changed: converted again, and refused
    (tmp_path / "myData/fresh/train.json").write_text("not json any more")
    with pytest.raises(UsageError, match="train.json: not valid JSON"):
        load_dataset("fresh")
    assert "again: myData/fresh changed since ofData/fresh was converted" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "myData/fresh")  # no source: the converted copy is read as it is
    assert load_dataset("fresh").num_classes == 3
    elsewhere = tmp_path / "moved"
    (tmp_path / "ofData/fresh").rename(elsewhere)
    assert load_dataset("anything", dataset_dir=elsewhere).input_shape == (1, 16, 16)
    assert load_dataset("digits").input_shape == (1, 32, 32)  # builtins first, even with a myData/digits folder


GOOD_TRAIN = {"data": [[1, 2, 3, 4], [5, 6, 7, 8]], "label": [0, 1], "shape": [1, 2, 2]}
GOOD_TEST = {"data": [[1, 2, 3, 4]], "label": [1]}
JSON_CASES = [
    ("missing_folder", None, None, r"dataset folder .*missing_folder not found"),
    ("no_test", GOOD_TRAIN, "absent", r"test.json not found"),
    (
        "bad_json",
        '{"data": [[1, 2, 3, 4]], "label": [0], "shape": [1, 2, 2]',
        GOOD_TEST,
        r"train.json: not valid JSON at line 1 column \d+",
    ),
    ("no_data", {"label": [0], "shape": [1, 2, 2]}, GOOD_TEST, r"train.json: missing 'data'"),
    ("no_label", {"data": [[1, 2, 3, 4]], "shape": [1, 2, 2]}, GOOD_TEST, r"train.json: missing 'label'"),
    ("no_shape", {"data": [[1, 2, 3, 4]], "label": [0]}, GOOD_TEST, r"train.json: missing 'shape'"),
    ("bad_shape", {**GOOD_TRAIN, "shape": [1, 0, 4]}, GOOD_TEST, r"'shape' must be three positive integers"),
    (
        "short_row",
        {**GOOD_TRAIN, "data": [[1, 2, 3, 4], [5, 6, 7]]},
        GOOD_TEST,
        r"train.json: data row 1 has 3 values, expected C\*H\*W = 4",
    ),
    (
        "nested_row",
        {**GOOD_TRAIN, "data": [[1, 2, 3, 4], [[5, 6], [7, 8]]]},
        GOOD_TEST,
        r"data row 1 holds a nested list at line 1 column \d+",
    ),
    (
        "huge_pixel",
        {**GOOD_TRAIN, "data": [[1, 2, 3, 4], [5, 6, 7, 10**30]]},
        GOOD_TEST,
        r"data row 1, value 3: 1e\+30 is outside 0..255",
    ),
    (
        "text_pixel",
        GOOD_TRAIN,
        {"data": [[1, "x", 3, 4]], "label": [1]},
        r"test.json: data row 0, value 1: 'x' is not a number",
    ),
    (
        "bool_pixel",
        {**GOOD_TRAIN, "data": [[1, 2, 3, 4], [5, 6, True, 8]]},
        GOOD_TEST,
        r"data row 1, value 2: True is not a number",
    ),
    (
        "hot_pixel",
        {**GOOD_TRAIN, "data": [[1, 2, 3, 4], [5, 6, 7, 256]]},
        GOOD_TEST,
        r"data row 1, value 3: 256 is outside 0..255",
    ),
    (
        "neg_pixel",
        {**GOOD_TRAIN, "data": [[1, -0.5, 3, 4], [5, 6, 7, 8]]},
        GOOD_TEST,
        r"data row 0, value 1: -0.5 is outside 0..255",
    ),
    (
        "bad_label",
        {**GOOD_TRAIN, "label": [0, -1]},
        GOOD_TEST,
        r"train.json: label 1 is -1, not a non-negative integer",
    ),
    ("float_label", {**GOOD_TRAIN, "label": [0, 1.5]}, GOOD_TEST, r"label 1 is 1.5, not a non-negative integer"),
    ("mismatch", {**GOOD_TRAIN, "label": [0]}, GOOD_TEST, r"'data' has 2 rows but 'label' has 1 values"),
    ("empty", GOOD_TRAIN, {"data": [], "label": []}, r"test.json: the split is empty"),
    (
        "unseen",
        GOOD_TRAIN,
        {"data": [[1, 2, 3, 4]], "label": [7]},
        r"test.json: label 0 is 7, a class never seen in train.json",
    ),
]


@pytest.mark.parametrize("name, train, test, message", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_bad_json_is_one_line_exit_2_and_leaves_nothing(tmp_path, monkeypatch, capsys, name, train, test, message):
    monkeypatch.chdir(tmp_path)
    if train is not None:
        folder = tmp_path / "myData" / name
        folder.mkdir(parents=True)
        (folder / "train.json").write_text(train if isinstance(train, str) else json.dumps(train))
        if test != "absent":
            (folder / "test.json").write_text(json.dumps(test))
    assert ofrecordMake.main(["--dataName", name]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "ofData").exists() or not any((tmp_path / "ofData").iterdir()), (
        "nothing may be left under ofData"
    )


def _good_ofrecord(tmp_path: Path) -> Path:
    write_json_dataset(tmp_path, "good", sample(4, (1, 2, 2)), {"data": sample(2, (1, 2, 2))["data"], "label": [0, 1]})
    return convert_json_dataset("good", tmp_path / "myData", tmp_path / "ofData")


def _corrupt(target: Path, how: str) -> None:
    part = target / "train" / "part-00000"
    blob = part.read_bytes()
    (length,) = struct.unpack_from("<q", blob)
    meta = json.loads((target / "meta.json").read_text())
    if how == "truncated":
        part.write_bytes(blob[:-5])
    elif how == "short_header":
        part.write_bytes(blob + b"\x01\x00")
    elif how == "zero_length":
        part.write_bytes(struct.pack("<q", 0) + blob)
    elif how == "huge_length":
        part.write_bytes(struct.pack("<q", 2**40) + blob[8:])
    elif how == "garbage":
        part.write_bytes(struct.pack("<q", 3) + b"\xff\xff\xff" + blob)
    elif how == "missing_feature":
        record = _field(1, _field(1, b"images") + _field(2, _field(2, _field(1, struct.pack("<4f", 1, 2, 3, 4)))))
        part.write_bytes(struct.pack("<q", len(record)) + record + blob)
    elif how == "wrong_count":
        record = hand_record([1.0, 2.0, 3.0], 0)
        part.write_bytes(struct.pack("<q", len(record)) + record + blob)
    elif how == "bad_label":
        record = hand_record([1.0, 2.0, 3.0, 4.0], 9)
        part.write_bytes(struct.pack("<q", len(record)) + record + blob)
    elif how == "no_meta":
        (target / "meta.json").unlink()
    elif how == "count_mismatch":
        (target / "meta.json").write_text(json.dumps({**meta, "num_examples": 5}))
    elif how == "bad_meta_shape":
        (target / "meta.json").write_text(json.dumps({**meta, "image_shape": [1, 2]}))
    elif how == "meta_not_json":
        (target / "meta.json").write_text("{")
    assert length > 0


OFRECORD_CASES = [
    ("truncated", r"part-00000: truncated: record 3 at byte \d+ claims \d+ bytes but only \d+ remain"),
    ("short_header", r"truncated: record 4 at byte \d+ has a 2-byte length field"),
    ("zero_length", r"record 0 at byte 0 claims 0 bytes; OneFlow needs 1..67108864"),
    ("huge_length", r"record 0 at byte 0 claims 1099511627776 bytes"),
    ("garbage", r"record 0 at byte 0 is not a valid OFRecord"),
    ("missing_feature", r"record 0 lacks the 'images' or 'labels' feature"),
    ("wrong_count", r"record 0 has 3 pixel values, expected C\*H\*W = 4"),
    ("bad_label", r"record 0 has label \[9\], expected one value in 0..2"),
    ("no_meta", r"meta.json not found"),
    ("count_mismatch", r"holds 4 records but meta.json says 5"),
    ("bad_meta_shape", r"image_shape must be three positive integers"),
    ("meta_not_json", r"meta.json: not valid JSON"),
]


@pytest.mark.parametrize("how, message", OFRECORD_CASES, ids=[c[0] for c in OFRECORD_CASES])
def test_bad_ofrecord_input_is_reported_precisely(tmp_path, how, message):
    target = _good_ofrecord(tmp_path)
    _corrupt(target, how)
    with pytest.raises(UsageError, match=message):
        load_ofrecord_dataset(target, "good")


def test_bad_ofrecord_through_run_py_is_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _corrupt(_good_ofrecord(tmp_path), "truncated")
    assert run.main(["--data_type", "good", "--step", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "truncated" in err
