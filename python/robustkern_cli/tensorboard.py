"""TensorBoard scalar logging without the ``tensorboard`` package: a writer and a reader of event files.

An event file is a sequence of TFRecords (TensorFlow ``tensorflow/core/lib/io/record_writer.cc``)::

    uint64 length (little-endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

with ``masked_crc32c(b) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2**32)``, ``c = crc32c(b)`` (Castagnoli
polynomial, reflected ``0x82F63B78``). Each record's data is a serialised ``tensorflow.Event`` protobuf
(``tensorboard/compat/proto/event.proto``): ``wall_time`` (field 1, double), ``step`` (2, int64),
``file_version`` (3, string; the first record says ``"brain.Event:2"``) or ``summary`` (5, ``Summary``), where
``Summary.value`` (1, repeated) holds ``Summary.Value`` messages with ``tag`` (1, string) and ``simple_value``
(2, float). TensorBoard's scalar dashboard reads ``simple_value`` summaries (its ``data_compat`` turns them into
scalar tensors). The protobuf fields are hand-encoded here (varint keys ``field << 3 | wire_type``).

:func:`open_writer` returns ``torch.utils.tensorboard.SummaryWriter`` when the ``tensorboard`` package is
installed and :class:`EventFileWriter` otherwise; both have ``add_scalar(tag, value, step)``, ``flush()`` and
``close()``. :func:`read_events` decodes a file back (checking every CRC), for tests and quick inspection.
"""
from __future__ import annotations

import importlib.util
import math
import os
import socket
import struct
import time
from pathlib import Path

__all__ = ["EventFileWriter", "open_writer", "read_events", "read_scalars", "crc32c", "masked_crc32c"]

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as in RFC 3720; ``crc32c(b"123456789") == 0xE3069283``."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------------ protobuf encoding
def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 fields encode negatives as 10-byte two's complement
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _len_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int = 0, *, file_version: str | None = None,
                 scalars: dict | None = None) -> bytes:
    """A serialised ``Event``: ``file_version`` or a ``Summary`` of ``simple_value`` scalars."""
    out = _key(1, 1) + struct.pack("<d", wall_time)
    if step:
        out += _key(2, 0) + _varint(int(step))
    if file_version is not None:
        out += _len_delimited(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _len_delimited(1, _len_delimited(1, str(tag).encode()) + _key(2, 5) + struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        out += _len_delimited(5, summary)
    return out


def _frame(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


class EventFileWriter:
    """Append scalar summaries to ``<logdir>/events.out.tfevents.<unix time>.<host>.<pid>.<n>``.

    Dependency-free stand-in for ``SummaryWriter.add_scalar``; records are buffered and written on
    :meth:`flush` (also every ``flush_every`` records and on :meth:`close`)."""

    _count = 0

    def __init__(self, logdir: str | os.PathLike, flush_every: int = 50):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        EventFileWriter._count += 1
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{EventFileWriter._count:06d}")  # padded: name order is creation order (read_scalars)
        self.path = self.logdir / name
        self._file = open(self.path, "wb")
        self._pending: list[bytes] = []
        self.flush_every = max(int(flush_every), 1)
        self._write(encode_event(time.time(), file_version="brain.Event:2"))
        self.flush()

    def _write(self, event: bytes) -> None:
        self._pending.append(_frame(event))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def add_scalar(self, tag: str, value, global_step: int | None = None, walltime: float | None = None) -> None:
        if self._file is None:
            raise ValueError(f"{self.path} is closed")
        value = float(value)
        self._write(encode_event(time.time() if walltime is None else walltime, int(global_step or 0),
                                 scalars={tag: value}))

    def flush(self) -> None:
        if self._file is not None and self._pending:
            self._file.write(b"".join(self._pending))
            self._file.flush()
            self._pending.clear()

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_writer(logdir: str | os.PathLike):
    """``torch.utils.tensorboard.SummaryWriter(logdir)`` when ``tensorboard`` is installed, else
    :class:`EventFileWriter` (same ``add_scalar``/``flush``/``close``)."""
    if importlib.util.find_spec("tensorboard") is not None:
        try:
            from torch.utils.tensorboard import SummaryWriter
            return SummaryWriter(str(logdir))
        except ImportError:  # a tensorboard too old or broken for torch: fall back
            pass
    return EventFileWriter(logdir)


# ------------------------------------------------------------------------------------------ decoding
def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """(field, wire_type, value) of a protobuf message; value is int, bytes or raw fixed-width bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _read_varint(buf, pos)
        elif wt == 1:
            val, pos = buf[pos:pos + 8], pos + 8
        elif wt == 2:
            n, pos = _read_varint(buf, pos)
            val, pos = buf[pos:pos + n], pos + n
        elif wt == 5:
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        yield field, wt, val


def decode_event(data: bytes) -> dict:
    ev: dict = {"wall_time": 0.0, "step": 0, "scalars": {}}
    for field, wt, val in _fields(data):
        if field == 1 and wt == 1:
            ev["wall_time"] = struct.unpack("<d", val)[0]
        elif field == 2 and wt == 0:
            ev["step"] = val - (1 << 64) if val >= 1 << 63 else val
        elif field == 3 and wt == 2:
            ev["file_version"] = val.decode()
        elif field == 5 and wt == 2:
            for f_value, _, value_msg in _fields(val):
                if f_value != 1:
                    continue
                tag, simple = None, None
                for f, w, v in _fields(value_msg):
                    if f == 1 and w == 2:
                        tag = v.decode()
                    elif f == 2 and w == 5:
                        simple = struct.unpack("<f", v)[0]
                if tag is not None and simple is not None:
                    ev["scalars"][tag] = simple
    return ev


def read_events(path: str | os.PathLike) -> list[dict]:
    """Every event of a file as ``{"wall_time", "step", "scalars": {tag: value}, ["file_version"]}``;
    a bad CRC or a truncated record raises ValueError."""
    buf = Path(path).read_bytes()
    pos, events = 0, []
    while pos < len(buf):
        if pos + 12 > len(buf):
            raise ValueError(f"{path}: truncated record header at byte {pos}")
        length_bytes = buf[pos:pos + 8]
        (n,) = struct.unpack("<Q", length_bytes)
        (crc,) = struct.unpack("<I", buf[pos + 8:pos + 12])
        if crc != masked_crc32c(length_bytes):
            raise ValueError(f"{path}: length CRC mismatch at byte {pos}")
        data = buf[pos + 12:pos + 12 + n]
        if len(data) != n or pos + 16 + n > len(buf):
            raise ValueError(f"{path}: truncated record at byte {pos}")
        (crc,) = struct.unpack("<I", buf[pos + 12 + n:pos + 16 + n])
        if crc != masked_crc32c(data):
            raise ValueError(f"{path}: data CRC mismatch at byte {pos}")
        events.append(decode_event(data))
        pos += 16 + n
    return events


def read_scalars(logdir: str | os.PathLike) -> dict:
    """``{tag: [(step, value), ...]}`` over every event file in ``logdir`` (files in name order)."""
    out: dict = {}
    for f in sorted(Path(logdir).glob("events.out.tfevents.*")):
        for ev in read_events(f):
            for tag, v in ev["scalars"].items():
                out.setdefault(tag, []).append((ev["step"], v))
    return out


def is_finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
