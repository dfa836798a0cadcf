"""Dataclass fields -> argparse flags, the way users' upstream launch scripts spell them.

Upstream parses with `HfArgumentParser`; we keep its conventions (`--flag value`, `--flag True/False`,
bare `--bool_flag` meaning True) and also accept integer products such as `--max_pixels 576*28*28`,
which upstream's README shows but its parser rejects.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any

_PRODUCT = re.compile(r"^\s*\d+(\s*\*\s*\d+)*\s*$")


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_int(text: str) -> int:
    """An integer or a product of integers (`576*28*28`)."""
    if not _PRODUCT.match(str(text)):
        raise argparse.ArgumentTypeError(f"expected an integer or a product like 576*28*28, got {text!r}")
    value = 1
    for factor in str(text).split("*"):
        value *= int(factor)
    return value


def _field_type(tp: Any) -> Any:
    """The scalar type of a field annotation, `Optional[X]` / `X | None` unwrapped to X."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if type(None) in typing.get_args(tp) and len(args) == 1:
        return args[0]
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--name` flag per field of `cls`, with its default and its `help` metadata."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        tp = _field_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = f"{field.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        kwargs: dict[str, Any] = {"default": default, "help": help_text}
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        if tp is bool:
            group.add_argument(f"--{field.name}", type=parse_bool, nargs="?", const=True, **kwargs)
        elif tp is int:
            group.add_argument(f"--{field.name}", type=parse_int, **kwargs)
        elif tp is float:
            group.add_argument(f"--{field.name}", type=float, **kwargs)
        elif typing.get_origin(tp) is list:
            group.add_argument(f"--{field.name}", nargs="+", **kwargs)
        else:
            group.add_argument(f"--{field.name}", type=str, **kwargs)


def dataclass_from_args(cls: type, namespace: argparse.Namespace) -> Any:
    """Build `cls` from the parsed flags that belong to it."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(namespace).items() if k in names})
