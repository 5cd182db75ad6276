"""Stream a myData JSON split ({"data": [[...], ...], "label": [...], "shape": [C, H, W]}) row by row.

A 50,000-image CIFAR-sized split is ~600 MB of JSON and ~1.2 GB as Python lists, so
the file is memory-mapped and scanned once for the top-level keys and the byte span of
every `data` row; rows are then parsed by whoever converts them (simdjson, orjson to name a bad one).
Every other top-level value (labels, shape) is small and parsed whole.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import UsageError

WHITESPACE = b" \t\r\n"


@dataclass
class JsonSplit:
    path: Path
    buffer: mmap.mmap | bytes
    row_spans: list[tuple[int, int]] | None = None  # None: no "data" key
    values: dict[str, Any] = field(default_factory=dict)  # every other top-level key

    def row_bytes(self, index: int) -> bytes:
        start, end = self.row_spans[index]  # type: ignore[index]
        return self.buffer[start:end]


class _Scanner:
    def __init__(self, path: Path, buffer: mmap.mmap | bytes) -> None:
        self.path, self.buf, self.pos, self.size = path, buffer, 0, len(buffer)

    def where(self, at: int) -> str:
        line = self.buf[:at].count(b"\n") + 1
        column = at - (self.buf.rfind(b"\n", 0, at) + 1) + 1
        return f"line {line} column {column}"

    def fail(self, what: str, at: int | None = None) -> UsageError:
        at = self.pos if at is None else at
        return UsageError(
            f"{self.path}: not valid JSON at {self.where(at)}: {what}; fix the file (e.g. check it with python -m "
            "json.tool)"
        )

    def skip(self) -> int:
        while self.pos < self.size and self.buf[self.pos] in WHITESPACE:
            self.pos += 1
        return self.buf[self.pos] if self.pos < self.size else -1

    def expect(self, char: bytes) -> None:
        if self.skip() != char[0]:
            raise self.fail(f"expected {char.decode()!r}")
        self.pos += 1

    def string(self) -> str:
        start = self.pos
        if self.skip() != ord('"'):
            raise self.fail("expected a key in double quotes")
        end = self.pos + 1
        while True:
            end = self.buf.find(b'"', end)
            if end < 0:
                raise self.fail("unterminated string", start)
            backslashes = 0
            while self.buf[end - 1 - backslashes] == ord("\\"):
                backslashes += 1
            if backslashes % 2 == 0:
                break
            end += 1
        text = orjson.loads(self.buf[self.pos : end + 1])
        self.pos = end + 1
        return text

    def value_end(self) -> int:
        """End of the JSON value at pos: brackets matched, strings skipped."""
        depth, index, in_string = 0, self.pos, False
        buf = self.buf
        while index < self.size:
            char = buf[index]
            if in_string:
                if char == ord("\\"):
                    index += 1
                elif char == ord('"'):
                    in_string = False
            elif char == ord('"'):
                in_string = True
            elif char in b"[{":
                depth += 1
            elif char in b"]}":
                depth -= 1
                if depth < 0:
                    return index
                if depth == 0:
                    return index + 1
            elif char in b",}" and depth == 0:
                return index
            index += 1
        raise self.fail("the file ends inside a value", self.pos)

    def rows(self) -> list[tuple[int, int]]:
        self.expect(b"[")
        spans: list[tuple[int, int]] = []
        if self.skip() == ord("]"):
            self.pos += 1
            return spans
        while True:
            if self.skip() != ord("["):
                raise self.fail(f"data row {len(spans)} is not a list of pixel values")
            end = self.buf.find(b"]", self.pos)
            if end < 0:
                raise self.fail(f"data row {len(spans)} is not closed")
            nested = self.buf.find(b"[", self.pos + 1, end)
            if nested >= 0:
                where = self.where(nested)
                raise UsageError(
                    f"{self.path}: data row {len(spans)} holds a nested list at {where}; each row must be a flat list "
                    "of C*H*W pixel values"
                )
            spans.append((self.pos, end + 1))
            self.pos = end + 1
            char = self.skip()
            self.pos += 1
            if char == ord("]"):
                return spans
            if char != ord(","):
                raise self.fail(f"expected ',' or ']' after data row {len(spans) - 1}", self.pos - 1)


def open_split(path: Path) -> JsonSplit:
    """Scan a split file once; rows stay in the memory map until read."""
    with path.open("rb") as handle:
        try:
            buffer: mmap.mmap | bytes = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file cannot be mapped
            buffer = b""
    scanner = _Scanner(path, buffer)
    split = JsonSplit(path, buffer)
    if scanner.skip() != ord("{"):
        raise scanner.fail("the top level must be an object with data, label (and shape in train.json)")
    scanner.pos += 1
    if scanner.skip() == ord("}"):
        scanner.pos += 1
    else:
        while True:
            key = scanner.string()
            scanner.expect(b":")
            scanner.skip()
            if key == "data" and scanner.buf[scanner.pos : scanner.pos + 1] == b"[":
                split.row_spans = scanner.rows()
            else:
                start = scanner.pos
                end = scanner.value_end()
                try:
                    split.values[key] = orjson.loads(scanner.buf[start:end])
                except orjson.JSONDecodeError as error:
                    raise scanner.fail(f"the value of {key!r} does not parse ({error})", start) from None
                scanner.pos = end
            char = scanner.skip()
            scanner.pos += 1
            if char == ord("}"):
                break
            if char != ord(","):
                raise scanner.fail("expected ',' or '}' between keys", scanner.pos - 1)
    if scanner.skip() != -1:
        raise scanner.fail("extra data after the top-level object")
    if split.row_spans is None and "data" in split.values:
        raise UsageError(
            f"{path}: 'data' must be a list of rows of pixel values, got {type(split.values['data']).__name__}"
        )
    return split
