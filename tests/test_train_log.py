"""Training logs: JSONL lines, and TensorBoard event files checked with an independent CRC-32C and protobuf."""

from __future__ import annotations

import json
import math
import struct

import pytest

from qwenvl.train.train_log import TrainLogger, crc32c, masked_crc32c


def bitwise_crc32c(data: bytes) -> int:
    """CRC-32C one bit at a time (reflected Castagnoli polynomial), no lookup table."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def tf_masked(crc: int) -> int:
    """TensorFlow's `crc32c::Mask`: rotate right by 15 bits and add 0xa282ead8."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_known_vectors():
    assert bitwise_crc32c(b"123456789") == 0xE3069283
    # RFC 3720 (iSCSI) appendix B.4 vectors
    vectors = {bytes(32): 0x8A9136AA, b"\xff" * 32: 0x62A8AB43, bytes(range(32)): 0x46DD794E, b"": 0}
    for data, want in vectors.items():
        assert bitwise_crc32c(data) == want
    for data in (b"123456789", *vectors, b"brain.Event:2" * 7):
        assert crc32c(data) == bitwise_crc32c(data)
        assert masked_crc32c(data) == tf_masked(bitwise_crc32c(data))


def read_records(path) -> list[bytes]:
    """TFRecord framing, every CRC verified independently."""
    blob = path.read_bytes()
    records, pos = [], 0
    while pos < len(blob):
        header = blob[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", blob[pos + 8 : pos + 12])
        assert header_crc == tf_masked(bitwise_crc32c(header))
        payload = blob[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", blob[pos + 12 + length : pos + 16 + length])
        assert len(payload) == length and payload_crc == tf_masked(bitwise_crc32c(payload))
        records.append(payload)
        pos += 16 + length
    return records


def event_class():
    """`tensorflow.Event` with just the fields a scalar log uses, built from a descriptor at run time."""
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="test_event.proto", package="testtb", syntax="proto3")

    def message(name: str, fields) -> None:
        msg = proto.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            msg.field.add(name=field_name, number=number, type=kind, label=label, type_name=type_name)

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("Value", [("tag", 1, F.TYPE_STRING, opt, None), ("simple_value", 2, F.TYPE_FLOAT, opt, None)])
    message("Summary", [("value", 1, F.TYPE_MESSAGE, rep, ".testtb.Value")])
    message("Event", [
        ("wall_time", 1, F.TYPE_DOUBLE, opt, None), ("step", 2, F.TYPE_INT64, opt, None),
        ("file_version", 3, F.TYPE_STRING, opt, None), ("summary", 5, F.TYPE_MESSAGE, opt, ".testtb.Summary"),
    ])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("testtb.Event"))


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    logger = TrainLogger(tmp_path, total_steps=3, tensorboard=True, progress=False)
    records = [
        {"step": 1, "loss": 2.5, "lr": {"base_decay": 1e-4, "merger_decay": 2e-5}, "grad_norm": 0.75, "skipped": False, "note": "x"},
        {"step": 2, "loss": float("nan"), "lr": {"base_decay": 5e-5, "merger_decay": 1e-5}, "grad_norm": float("inf"), "tokens": 300},
    ]
    for record in records:
        logger.log(record)
    logger.message("hello")
    logger.close()

    lines = (tmp_path / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
    parsed = [json.loads(line) for line in lines]  # strict JSON: NaN/inf are written as strings
    assert parsed[0] == records[0]
    assert parsed[1]["loss"] == "nan" and parsed[1]["grad_norm"] == "inf" and parsed[1]["tokens"] == 300
    assert all("NaN" not in line and "Infinity" not in line for line in lines)

    event_files = list((tmp_path / "runs").glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    Event = event_class()
    events = [Event.FromString(payload) for payload in read_records(event_files[0])]
    assert events[0].file_version == "brain.Event:2" and events[0].wall_time > 0
    scalars = [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:]]
    assert [step for step, _ in scalars] == [1, 2]
    first, second = scalars[0][1], scalars[1][1]
    assert set(first) == {"train/loss", "train/lr/base_decay", "train/lr/merger_decay", "train/grad_norm"}
    assert first["train/loss"] == 2.5 and first["train/grad_norm"] == 0.75
    assert first["train/lr/base_decay"] == pytest.approx(1e-4, rel=1e-7)  # float32 on disk
    assert first["train/lr/merger_decay"] == pytest.approx(2e-5, rel=1e-7)
    assert math.isnan(second["train/loss"]) and math.isinf(second["train/grad_norm"]) and second["train/tokens"] == 300


def test_disabled_logger_writes_nothing(tmp_path):
    logger = TrainLogger(tmp_path / "out", total_steps=2, enabled=False, tensorboard=True)
    logger.log({"step": 1, "loss": 1.0})
    logger.message("quiet")
    logger.advance(1, 1.0)
    logger.close()
    assert not (tmp_path / "out").exists()
