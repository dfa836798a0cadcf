"""Flag parsing: upstream spellings, bool forms and integer products."""

from __future__ import annotations

import argparse

import pytest

from qwenvl.cli_args import add_dataclass_args, dataclass_from_args, parse_int
from qwenvl.data.arguments import DataArguments


def parse(argv):
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, DataArguments)
    return dataclass_from_args(DataArguments, parser.parse_args(argv))


def test_defaults_are_upstream_defaults():
    args = parse([])
    assert (args.max_pixels, args.min_pixels) == (451584, 12544)
    assert (args.video_max_frames, args.video_min_frames, args.base_interval) == (8, 4, 2)
    assert (args.video_max_frame_pixels, args.video_min_frame_pixels) == (25088, 3136)
    assert (args.video_max_pixels, args.video_min_pixels, args.video_fps) == (802816, 200704, 2.0)
    assert args.data_flatten is False and args.data_packing is False and args.dataset_use == ""


def test_products_and_bool_forms():
    args = parse(["--max_pixels", "576*28*28", "--min_pixels", "784", "--data_flatten", "True", "--data_packing"])
    assert args.max_pixels == 451584 and args.min_pixels == 784
    assert args.data_flatten is True and args.data_packing is True
    assert parse(["--data_flatten", "false"]).data_flatten is False


@pytest.mark.parametrize("bad", ["576x28", "1.5", "", "28**2"])
def test_bad_integers_rejected(bad):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_int(bad)
