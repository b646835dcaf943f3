"""Write TensorBoard event files without tensorboard or tensorboardX.

An event file (``events.out.tfevents.<unix time>.<hostname>``) is a sequence of TFRecords::

    uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

(little-endian), where each ``data`` is a serialized ``tensorflow.Event`` protobuf. The first record
carries ``file_version = "brain.Event:2"``; each scalar is an Event with ``wall_time``, ``step`` and a
``Summary`` holding one ``Value{tag, simple_value}``. The few protobuf fields needed are encoded by hand
below (field numbers from tensorboard/compat/proto/event.proto and summary.proto).

The file is flushed after every record, so a run that is killed keeps every event it wrote.
"""

from __future__ import annotations

import math
import operator
import os
import socket
import struct
import time
from pathlib import Path

from ..errors import SlmError

# --- CRC-32C (Castagnoli), as TFRecord uses it --------------------------------------------------

_CRC32C_POLY = 0x82F63B78  # 0x1EDC6F41 bit-reversed


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _make_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (crc32c(b"123456789") == 0xE3069283)."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The rotated-and-offset CRC that TFRecord stores (so CRCs of CRCs do not degenerate)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """``data`` framed as one TFRecord."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


# --- protobuf wire format, only what Event needs -----------------------------------------------

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # negative int64 -> two's complement, ten bytes
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # finite but beyond float32: it is +-inf in float32
        return struct.pack("<f", math.copysign(math.inf, value))


def _event(wall_time: float, step: int, body: bytes) -> bytes:
    """Event{wall_time = 1 (double), step = 2 (int64), <body>}; ``body`` is one of the ``what`` fields."""
    return _key(1, _FIXED64) + struct.pack("<d", wall_time) + _key(2, _VARINT) + _varint(step) + body


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
    """Serialized Event{wall_time, step, summary = 5 {value = 1 {tag = 1, simple_value = 2}}}."""
    summary_value = _len_field(1, tag.encode("utf-8")) + _key(2, _FIXED32) + _float32(value)
    summary = _len_field(1, summary_value)
    return _event(wall_time, step, _len_field(5, summary))


def file_version_event(wall_time: float) -> bytes:
    """Serialized Event{wall_time, step = 0, file_version = 3: "brain.Event:2"}."""
    return _event(wall_time, 0, _len_field(3, b"brain.Event:2"))


def session_start_event(step: int, wall_time: float) -> bytes:
    """Serialized Event{wall_time, step, session_log = 7 {status = 1: START}}.

    TensorBoard drops every event it has read with a step >= ``step`` when it meets this one, which is
    how a run restarted from an earlier checkpoint hides the steps it is about to redo.
    """
    return _event(wall_time, step, _len_field(7, _key(1, _VARINT) + _varint(1)))


# --- the writer ---------------------------------------------------------------------------------


class EventWriter:
    """Appends events to a new ``events.out.tfevents.<time>.<host>`` file in ``log_dir``.

    ``add_scalar(tag, value, step)`` for each scalar; ``close()`` (or use it as a context manager) at the
    end. Every record is flushed to the OS as soon as it is written.
    """

    def __init__(self, log_dir: str | os.PathLike[str]):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        base = f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
        self.path, self._file = self._open_new(base)
        self._write(file_version_event(now))

    def _open_new(self, base: str):
        # Two writers started in the same second in one folder must not share a file.
        for n in range(1000):
            path = self.log_dir / (base if n == 0 else f"{base}.{n}")
            try:
                return path, open(path, "xb")
            except FileExistsError:
                continue
        raise SlmError(f"cannot create a new event file in {self.log_dir}: too many named {base}*")

    def _write(self, event: bytes) -> None:
        if self._file is None:
            raise SlmError(f"event file {self.path} is closed; no more events can be written to it")
        self._file.write(tfrecord(event))
        self._file.flush()

    def add_scalar(self, tag: str, value: float, step: int, wall_time: float | None = None) -> None:
        """Record ``value`` (stored as float32) for ``tag`` at ``step``."""
        if not isinstance(tag, str) or not tag:
            raise SlmError(f"a scalar needs a non-empty string tag, got {tag!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise SlmError(f"scalar {tag!r}: value {value!r} is not a number") from None
        self._write(scalar_event(tag, value, _check_step(step), time.time() if wall_time is None else wall_time))

    def add_session_start(self, step: int, wall_time: float | None = None) -> None:
        """Mark a (re)start at ``step``: TensorBoard discards events already read with steps >= ``step``."""
        self._write(session_start_event(_check_step(step), time.time() if wall_time is None else wall_time))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_step(step) -> int:
    try:
        if isinstance(step, bool):
            raise TypeError
        step = operator.index(step)
    except TypeError:
        raise SlmError(f"a step must be an integer, got {step!r}") from None
    if not -(2**63) <= step < 2**63:
        raise SlmError(f"step {step} does not fit an int64")
    return step
