"""Training logs: JSONL lines, TensorBoard scalar events, a rank-0 progress bar, and memory readings.

There is no `tensorboard` package in the environment, so the event file is written here: TFRecord
framing (length, masked CRC-32C, payload, masked CRC-32C) around hand-encoded `Event` protobufs holding
`simple_value` scalars, the format TensorBoard's reader consumes.
"""

from __future__ import annotations

import json
import math
import os
import resource
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, Mapping

_CRC32C_POLY = 0x82F63B78  # Castagnoli polynomial, bit-reversed
_CRC_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, the checksum TFRecord framing uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add a constant (mod 2^32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
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


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def encode_scalar_event(step: int, wall_time: float, scalars: Mapping[str, float]) -> bytes:
    """`Event{wall_time=1 (double), step=2 (int64), summary=5 {value=1 {tag=1, simple_value=2 (float)}}}`."""
    values = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) + _key(2, 5) + struct.pack("<f", float(value)))
        for tag, value in scalars.items()
    )
    return _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(int(step)) + _length_delimited(5, values)


def encode_file_version_event(wall_time: float) -> bytes:
    """The first record of every event file: `Event{wall_time, file_version="brain.Event:2"}`."""
    return _key(1, 1) + struct.pack("<d", wall_time) + _length_delimited(3, b"brain.Event:2")


def frame_record(payload: bytes) -> bytes:
    """TFRecord framing: uint64 length, masked CRC of the length, payload, masked CRC of the payload."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


class TensorBoardWriter:
    """Appends scalar events to `log_dir/events.out.tfevents.<time>.<host>.<pid>`."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = self.log_dir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(self.path, "ab")
        self._file.write(frame_record(encode_file_version_event(now)))
        self._file.flush()

    def add_scalars(self, step: int, scalars: Mapping[str, float], wall_time: float | None = None) -> None:
        finite = {tag: value for tag, value in scalars.items() if value is not None}
        if finite:
            event = encode_scalar_event(step, time.time() if wall_time is None else wall_time, finite)
            self._file.write(frame_record(event))
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def memory_stats() -> dict[str, float]:
    """Host RSS now and at peak (MiB), plus the device's peak allocation when not running on CPU."""
    import psutil

    stats = {
        "rss_mib": psutil.Process().memory_info().rss / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    import mindspore as ms

    if ms.get_context("device_target") != "CPU":
        stats["device_peak_mib"] = ms.runtime.max_memory_allocated() / 2**20
    return stats


def _json_ready(value: Any) -> Any:
    """NaN/inf are not JSON: write them as strings so the log stays parseable by any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    return value


class TrainLogger:
    """One sink for every log line: JSONL file, TensorBoard, and the rank-0 progress bar with ETA.

    Only the main rank writes; other ranks get a logger whose methods do nothing but keep the calls
    symmetric in the training loop.
    """

    def __init__(
        self,
        output_dir: str | Path,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = False,
        progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self.jsonl_path = Path(output_dir) / "train_log.jsonl"
        self._tb = TensorBoardWriter(Path(output_dir) / "runs") if (enabled and tensorboard) else None
        self._bar = None
        self._postfix: dict[str, str] = {}
        if enabled and progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if enabled:
            self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)

    def message(self, text: str) -> None:
        """A line for the user, printed above the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def advance(self, steps: int = 1, loss: float | None = None) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if loss is not None:
                self._postfix["loss"] = f"{loss:.4f}"
                self._bar.set_postfix(self._postfix, refresh=False)

    def log(self, record: dict[str, Any]) -> None:
        """Append `record` (must carry `step`) to the JSONL file and its numbers to TensorBoard; a training record's
        throughput goes to the progress bar (or, without one, to a printed line)."""
        if not self.enabled:
            return
        if "tokens_per_s" in record:
            rates = progress_rates(record)
            if self._bar is not None:
                self._postfix.update(rates)
                self._bar.set_postfix(self._postfix, refresh=True)
            else:
                shown = ", ".join(f"{k} {v}" for k, v in rates.items())
                print(f"[train] step {record['step']}: loss {record['loss']:.4f}, {shown}", flush=True)
        with open(self.jsonl_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_json_ready(record)) + "\n")
        if self._tb is not None:
            self._tb.add_scalars(record["step"], _flatten_scalars(record))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def progress_rates(record: Mapping[str, Any]) -> dict[str, str]:
    """Tokens/s and MFU (when the device's peak is known) of a log record, formatted for the progress line."""
    rates = {"tok/s": f"{record['tokens_per_s']:.0f}"}
    if record.get("mfu") is not None:
        rates["mfu"] = f"{100 * record['mfu']:.1f}%"
    return rates


def _flatten_scalars(record: Mapping[str, Any], prefix: str = "train/") -> dict[str, float]:
    """Numeric fields as TensorBoard tags (`train/loss`, `train/lr/<group>`); `step` is the event's step."""
    scalars = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, Mapping):
            scalars.update(_flatten_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[f"{prefix}{key}"] = float(value)
    return scalars
