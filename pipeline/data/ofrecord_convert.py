"""myData/<name>/{train,test}.json -> ofData/<name>/ (OFRecord part files + meta.json), streamed.

Everything is written under a temporary directory beside the target and renamed into
place when complete: a bad row anywhere leaves nothing under ofData/<name>. The converter
never writes where it reads (an --ofData_dir that is, holds or lies inside the source folder is
refused), and replaces only a dataset it wrote itself; meta.json records a hash of the JSON files
it came from, so a reader can tell when myData/<name> changed since.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import orjson
import simdjson

from pipeline.atomic import staged_directory
from pipeline.data.json_rows import JsonSplit, open_split
from pipeline.data.ofrecord import PART_FILE, image_record, is_image_shape, part_name, write_record
from pipeline.errors import UsageError

SPLITS = ("train", "test")
PARALLEL_FROM = 2000  # rows; below this a worker pool costs more than it saves


def check_name(name: str) -> None:
    """A dataset name is one plain folder name (any letters, spaces included): no separator, no '..', nothing hidden."""
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise UsageError(
            f"--dataName {name!r} is not a plain folder name; name a folder under --myData_dir (e.g. randomData255)"
        )


def check_apart(source: Path, ofdata_root: Path) -> None:
    """Refuse an output folder that is the source folder, lies inside it or holds it: the conversion would write where
    it reads."""
    src, out = source.resolve(), ofdata_root.resolve()
    if out == src or src in out.parents or out in src.parents:
        where = "is" if out == src else "lies inside" if src in out.parents else "holds"
        raise UsageError(
            f"--ofData_dir {ofdata_root} {where} the source folder {source}; choose an output folder apart from the "
            "JSON files"
        )


def source_digests(paths: dict[str, Path]) -> dict[str, str]:
    """sha256 of each source JSON file, keyed by file name: what meta.json records as the dataset's source."""
    digests = {}
    for path in paths.values():
        with path.open("rb") as handle:
            digests[path.name] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests


def written_by_converter(target: Path) -> bool:
    """A folder this converter wrote: meta.json and train/ test/ folders of part files, nothing else."""
    entries = {p.name: p for p in target.iterdir()}
    if "meta.json" not in entries or not set(entries) <= {"meta.json", *SPLITS}:
        return False
    return all(
        entries[s].is_dir() and all(PART_FILE.fullmatch(p.name) for p in entries[s].iterdir())
        for s in SPLITS
        if s in entries
    )


def stale_conversion(converted: Path, source: Path) -> str | None:
    """Why ofData/<name> no longer matches myData/<name> (the JSON changed, or the copy records no source), or None."""
    try:
        recorded = json.loads((converted / "meta.json").read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if not isinstance(recorded, dict):
        return f"{converted} records no source"
    current = source_digests(
        {split: source / f"{split}.json" for split in SPLITS if (source / f"{split}.json").is_file()}
    )
    return None if current == recorded else f"{source} changed since {converted} was converted"


def _ignore_interrupts() -> None:
    """Workers leave Ctrl-C to the parent, which stops them and says so in one line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class SplitStats:
    count: int
    total: np.ndarray  # per-channel sum
    total_sq: np.ndarray


def _shape(train: JsonSplit) -> tuple[int, int, int]:
    if "shape" not in train.values:
        raise UsageError(f"{train.path}: missing 'shape' ([C, H, W]); add it to train.json")
    shape = train.values["shape"]
    if not is_image_shape(shape):
        raise UsageError(f"{train.path}: 'shape' must be three positive integers [C, H, W], got {shape!r}")
    return tuple(shape)  # type: ignore[return-value]


def _labels(split: JsonSplit) -> list[int]:
    if split.row_spans is None:
        raise UsageError(f"{split.path}: missing 'data' (a list of rows of C*H*W pixel values 0..255)")
    if "label" not in split.values:
        raise UsageError(f"{split.path}: missing 'label' (a list of non-negative integers, one per data row)")
    labels = split.values["label"]
    if not isinstance(labels, list):
        raise UsageError(f"{split.path}: 'label' must be a list of non-negative integers, got {type(labels).__name__}")
    for index, label in enumerate(labels):
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise UsageError(f"{split.path}: label {index} is {label!r}, not a non-negative integer")
    if not split.row_spans:
        raise UsageError(f"{split.path}: the split is empty (no data rows); every split needs at least one image")
    if len(labels) != len(split.row_spans):
        raise UsageError(
            f"{split.path}: 'data' has {len(split.row_spans)} rows but 'label' has {len(labels)} values; they must "
            "match"
        )
    return labels


def _pixels(split: JsonSplit, index: int, size: int, shape: tuple[int, int, int]) -> list[float]:
    """Parse and check one row, naming the row and value at fault."""
    try:
        row = orjson.loads(split.row_bytes(index))
    except orjson.JSONDecodeError as error:
        raise UsageError(f"{split.path}: data row {index} is not valid JSON ({error})") from None
    if len(row) != size:
        raise UsageError(
            f"{split.path}: data row {index} has {len(row)} values, expected C*H*W = {size} for shape {list(shape)}"
        )
    if not set(map(type, row)) <= {int, float}:
        position, value = next((i, v) for i, v in enumerate(row) if type(v) not in (int, float))
        raise UsageError(
            f"{split.path}: data row {index}, value {position}: {value!r} is not a number (pixels are 0..255)"
        )
    for position, value in enumerate(row):
        if not 0 <= value <= 255:
            raise UsageError(f"{split.path}: data row {index}, value {position}: {value!r} is outside 0..255")
    return row  # ints and floats: the caller's float64 array converts them


def _fast_rows(split: JsonSplit, start: int, stop: int, size: int, parser: simdjson.Parser) -> np.ndarray | None:
    """Rows start..stop as one float64 array, or None when anything looks off (the slow path then names it).

    simdjson writes each row's numbers straight into a C buffer of doubles: no Python object
    per pixel, which is what made orjson + np.array the converter's bottleneck.
    """
    rows = np.empty((stop - start, size), dtype=np.float64)
    for offset, index in enumerate(range(start, stop)):
        try:
            # a flat list: the scanner refuses nested ones, which as_buffer would flatten
            document = parser.parse(split.row_bytes(index))
            try:
                values = np.frombuffer(document.as_buffer(of_type="d"), dtype=np.float64)
            finally:
                del document  # the parser refuses to parse again while a document is alive
        except (ValueError, TypeError, RuntimeError):  # e.g. a string or a 65-bit integer: the slow path names it
            return None
        if values.size != size:
            return None
        rows[offset] = values
    if not bool(((rows >= 0) & (rows <= 255)).all()):
        return None
    return rows


@functools.cache
def _parser() -> simdjson.Parser:
    """One reusable parser per process."""
    return simdjson.Parser()


@dataclass
class EncodedBatch:
    records: list[bytes]
    total: np.ndarray
    total_sq: np.ndarray


def encode_rows(
    split: JsonSplit, start: int, stop: int, labels: list[int], shape: tuple[int, int, int]
) -> EncodedBatch:
    """Serialized records for rows start..stop plus their per-channel sums (for meta.json)."""
    size = shape[0] * shape[1] * shape[2]
    rows = _fast_rows(split, start, stop, size, _parser())
    if rows is None:
        rows = np.array([_pixels(split, index, size, shape) for index in range(start, stop)], dtype=np.float64).reshape(
            stop - start, size
        )
    records = [image_record(pixels, labels[start + offset]) for offset, pixels in enumerate(_python_rows(rows))]
    per_channel = rows.reshape(len(rows), shape[0], -1)
    return EncodedBatch(records, per_channel.sum((0, 2)), np.square(per_channel).sum((0, 2)))


_PIXEL_FLOATS = np.array([float(value) for value in range(256)], dtype=object)  # one shared object per integer pixel


def _python_rows(rows: np.ndarray) -> Iterator[list[float]]:
    """Each row (already checked to lie in 0..255) as the list of Python floats protobuf wants.

    One row at a time, so the allocator reuses the same memory instead of mapping and zeroing
    ~10 MB of fresh pages per batch; integer pixels (the usual case) share 256 float objects
    instead of allocating 3,072 new ones per image. The values are the same either way.
    """
    integers = rows.astype(np.uint8)
    if np.array_equal(integers, rows):
        for row in integers:
            yield _PIXEL_FLOATS.take(row).tolist()
    else:
        for row in rows:
            yield row.tolist()


BATCH_ROWS = 128
_WORKER_SPLITS: dict[str, tuple[JsonSplit, list[int], tuple[int, int, int]]] = {}  # inherited by forked workers


@dataclass
class Task:
    """Rows start..stop of one split, written as length-prefixed records to `chunk`."""

    split: str
    start: int
    stop: int
    chunk: Path


def _encode_task(task: Task) -> tuple[np.ndarray, np.ndarray]:
    """Encode and write one chunk; only the channel sums travel back (records stay out of the result pipe)."""
    split, labels, shape = _WORKER_SPLITS[task.split]
    batch = encode_rows(split, task.start, task.stop, labels, shape)
    with task.chunk.open("wb") as handle:
        for record in batch.records:
            write_record(handle, record)
    return batch.total, batch.total_sq


def _append_file(source: Path, handle: BinaryIO) -> None:
    """Append `source` to `handle` (inside the kernel where it can), then delete it."""
    handle.flush()
    with source.open("rb") as chunk:
        size, copied = os.fstat(chunk.fileno()).st_size, 0
        with contextlib.suppress(AttributeError, OSError):  # no copy_file_range on this OS or filesystem
            while copied < size and (step := os.copy_file_range(chunk.fileno(), handle.fileno(), size - copied)):
                copied += step
        handle.seek(0, os.SEEK_END)  # both descriptors moved past what the kernel copied
        if copied < size:
            chunk.seek(copied)
            shutil.copyfileobj(chunk, handle, 2**20)
    source.unlink()


def _write_split(
    name: str, count: int, channels: int, folder: Path, part_num: int, encode: Callable, tick: Callable[[int], None]
) -> SplitStats:
    """Write parts in row order; `encode` yields each task's channel sums, in task order, once its chunk is on disk."""
    folder.mkdir(parents=True)
    chunks = folder / ".chunks"
    chunks.mkdir()
    stats = SplitStats(0, np.zeros(channels), np.zeros(channels))
    for part in range(part_num):
        first, last = part * count // part_num, (part + 1) * count // part_num
        tasks = [
            Task(name, start, min(start + BATCH_ROWS, last), chunks / f"{start:012d}")
            for start in range(first, last, BATCH_ROWS)
        ]
        with (folder / part_name(part)).open("wb") as handle:
            for task, (total, total_sq) in zip(tasks, encode(tasks), strict=True):
                _append_file(task.chunk, handle)
                stats.count += task.stop - task.start
                stats.total += total
                stats.total_sq += total_sq
                tick(task.stop - task.start)
    chunks.rmdir()
    return stats


def _meta(
    stats: dict[str, SplitStats], shape: tuple[int, int, int], num_classes: int, source: dict[str, str]
) -> dict[str, object]:
    """meta.json: per-channel mean/std over train+test on the 0..255 scale, as OneFlow's loaders expect."""
    count = sum(s.count for s in stats.values()) * shape[1] * shape[2]
    mean = sum(s.total for s in stats.values()) / count
    std = np.sqrt(np.maximum(sum(s.total_sq for s in stats.values()) / count - mean * mean, 0.0))
    return {
        "num_classes": num_classes,
        "image_shape": list(shape),
        "rgb_mean": [round(float(m), 6) for m in mean],
        "rgb_std": [round(float(s), 6) for s in std],
        "num_examples": stats["train"].count,
        "num_val_examples": stats["test"].count,
        "source": source,
    }


def convert_json_dataset(
    name: str,
    mydata_root: str | Path = "myData",
    ofdata_root: str | Path = "ofData",
    part_num: int = 1,
    progress: Callable[[int], Callable[[int], None]] | None = None,
    workers: int | None = None,
    unless_current: bool = False,
) -> Path:
    """Convert myData/<name> to ofData/<name>; returns the finished directory. Conversions of one source take turns (a
    lock on the source folder); `unless_current`: leave a copy that matches the source as it is (another process of
    this job may just have converted it)."""
    check_name(name)
    source, target = Path(mydata_root) / name, Path(ofdata_root) / name
    if not source.is_dir():
        raise UsageError(f"dataset folder {source} not found; put train.json and test.json there")
    if part_num < 1:
        raise UsageError(f"--part_num must be at least 1, got {part_num}")
    check_apart(source, Path(ofdata_root))
    if Path(ofdata_root).exists() and not Path(ofdata_root).is_dir():
        raise UsageError(f"--ofData_dir {ofdata_root} is a file; give a folder for the converted datasets")
    with _converting(source):
        if unless_current and target.is_dir() and stale_conversion(target, source) is None:
            return target
        if target.exists() and not (target.is_dir() and written_by_converter(target)):
            raise UsageError(
                f"{target} exists and is not a dataset this converter wrote; move it away or choose another "
                "--ofData_dir"
            )
        _convert(source, target, part_num, progress, workers)
    return target


@contextlib.contextmanager
def _converting(source: Path) -> Iterator[None]:
    """An exclusive flock on the source folder while it is converted (no file of its own to leave behind)."""
    fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):  # no flock on this file system: one converter at a time, as before
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _convert(
    source: Path,
    target: Path,
    part_num: int,
    progress: Callable[[int], Callable[[int], None]] | None,
    workers: int | None,
) -> None:
    """Read and check both splits, then write the parts and meta.json through a staging folder."""
    paths = {split: source / f"{split}.json" for split in SPLITS}
    for path in paths.values():
        if not path.is_file():
            raise UsageError(f"{path} not found; a dataset needs both train.json and test.json")
    digests = source_digests(paths)
    splits = {split: open_split(path) for split, path in paths.items()}
    shape = _shape(splits["train"])
    labels = {split: _labels(splits[split]) for split in SPLITS}
    num_classes = max(labels["train"]) + 1
    seen = set(labels["train"])
    for index, label in enumerate(labels["test"]):
        if label not in seen:
            raise UsageError(
                f"{paths['test']}: label {index} is {label}, a class never seen in train.json ({len(seen)} classes, "
                f"{min(seen)}..{max(seen)})"
            )
    parts = {split: min(part_num, len(labels[split])) for split in SPLITS}
    total_rows = sum(len(v) for v in labels.values())
    if total_rows < PARALLEL_FROM:
        workers = 1
    else:
        workers = max(1, min(workers if workers is not None else os.cpu_count() or 1, 8))
    _WORKER_SPLITS.clear()
    _WORKER_SPLITS.update({split: (splits[split], labels[split], shape) for split in SPLITS})
    # forked workers inherit the splits
    pool = multiprocessing.get_context("fork").Pool(workers, _ignore_interrupts) if workers > 1 else None
    try:
        with staged_directory(target) as staging:
            tick = progress(total_rows) if progress else (lambda _n: None)
            encode = (
                (lambda tasks: pool.imap(_encode_task, tasks)) if pool else (lambda tasks: map(_encode_task, tasks))
            )
            stats = {
                split: _write_split(split, len(labels[split]), shape[0], staging / split, parts[split], encode, tick)
                for split in SPLITS
            }
            (staging / "meta.json").write_text(json.dumps(_meta(stats, shape, num_classes, digests), indent=2))
    finally:
        if pool is not None:
            pool.terminate()
        _WORKER_SPLITS.clear()
