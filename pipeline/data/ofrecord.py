"""OneFlow's OFRecord format: the protobuf messages and the length-prefixed part files.

A part file is a sequence of (int64 little-endian byte length, serialized `oneflow.OFRecord`).
The messages are built from a descriptor with the `protobuf` package (no generated
code to keep in sync, and no hand-rolled wire format).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from pipeline.errors import UsageError

MAX_RECORD_BYTES = 64 * 2**20  # OneFlow's reader refuses larger records
LENGTH = struct.Struct("<q")
IMAGE_FEATURE, LABEL_FEATURE = "images", "labels"


def _build_messages() -> dict[str, type]:
    proto = descriptor_pb2.FileDescriptorProto(
        name="oneflow/core/record/record.proto", package="oneflow", syntax="proto2"
    )
    # FieldDescriptorProto types
    scalar_lists = {"BytesList": 12, "FloatList": 2, "DoubleList": 1, "Int32List": 5, "Int64List": 3}
    for name, field_type in scalar_lists.items():
        field = proto.message_type.add(name=name).field.add(name="value", number=1, type=field_type, label=3)
        if name != "BytesList":
            field.options.packed = True
    feature = proto.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (field_name, type_name) in enumerate(
        [
            ("bytes_list", "BytesList"),
            ("float_list", "FloatList"),
            ("double_list", "DoubleList"),
            ("int32_list", "Int32List"),
            ("int64_list", "Int64List"),
        ],
        start=1,
    ):
        feature.field.add(
            name=field_name, number=number, type=11, type_name=f".oneflow.{type_name}", label=1, oneof_index=0
        )
    record = proto.message_type.add(name="OFRecord")
    entry = record.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=9, label=1)
    entry.field.add(name="value", number=2, type=11, type_name=".oneflow.Feature", label=1)
    record.field.add(name="feature", number=1, type=11, type_name=".oneflow.OFRecord.FeatureEntry", label=3)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"oneflow.{name}"))
        for name in [*scalar_lists, "Feature", "OFRecord"]
    }


MESSAGES = _build_messages()
OFRecord = MESSAGES["OFRecord"]
FloatList = MESSAGES["FloatList"]
Int32List = MESSAGES["Int32List"]


def is_image_shape(value: object) -> bool:
    """[C, H, W]: three positive integers (JSON booleans are not integers here)."""
    return (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value)
    )


PART_FILE = re.compile(r"part-\d{5}")  # part_name's pattern


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def image_record(pixels: list[float], label: int) -> bytes:
    """One serialized OFRecord: `images` FloatList (C*H*W, 0..255, NCHW) and `labels` Int32List."""
    record = OFRecord()
    record.feature[IMAGE_FEATURE].float_list.value.extend(pixels)
    record.feature[LABEL_FEATURE].int32_list.value.append(label)
    return record.SerializeToString()


def write_record(handle: BinaryIO, payload: bytes) -> None:
    handle.write(LENGTH.pack(len(payload)))
    handle.write(payload)


def iter_records(path: Path) -> Iterator[tuple[int, object]]:
    """Yield (index, OFRecord) from one part file, checking every length against OneFlow's rules."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        index, offset = 0, 0
        while True:
            header = handle.read(LENGTH.size)
            if not header:
                return
            if len(header) < LENGTH.size:
                raise UsageError(
                    f"{path}: truncated: record {index} at byte {offset} has a {len(header)}-byte length field (needs "
                    "8)"
                )
            (length,) = LENGTH.unpack(header)
            if length <= 0 or length > MAX_RECORD_BYTES:
                raise UsageError(
                    f"{path}: record {index} at byte {offset} claims {length} bytes; OneFlow needs "
                    f"1..{MAX_RECORD_BYTES}"
                )
            if offset + LENGTH.size + length > size:
                raise UsageError(
                    f"{path}: truncated: record {index} at byte {offset} claims {length} bytes but only "
                    f"{size - offset - LENGTH.size} remain"
                )
            payload = handle.read(length)
            try:
                record = OFRecord.FromString(payload)
            except DecodeError as error:
                raise UsageError(f"{path}: record {index} at byte {offset} is not a valid OFRecord ({error})") from None
            yield index, record
            index += 1
            offset += LENGTH.size + length
