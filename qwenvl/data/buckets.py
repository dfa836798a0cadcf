"""Shape buckets: each micro-batch's token count and vision patch count are padded to a short, fixed list.

A compiled training step is specialised to its input shapes: each new shape costs a graph compilation
(seconds on a tiny model, minutes on a large one) and keeps that graph for the rest of the run. So the
collator pads every micro-batch to one of a few shapes, known before the first step:

- tokens (rows x length): the smallest bucket of a ladder of at most `MAX_LENGTH_BUCKETS` values, each
  twice the one below, the largest being the biggest micro-batch the flags allow (rows x
  `model_max_length`; the same values in both layouts);
- vision patches: none, or as many as the token bucket, or `unit` times as many (`unit` = merge size², 4
  for every Qwen family). A merged vision token is a token, so a micro-batch never has more than
  `unit` x tokens patches: three choices per token bucket are enough, coupled to it.

`frame_patches`, the most patches one frame can have under the run's pixel limits, is not padded to: it is
passed along (`vision_frame_patches`) as a static bound for the models' full-attention vision blocks, whose CPU
twin then computes each block of queries against the keys within one frame's reach instead of all patches.

So a run compiles at most 3 x (number of token buckets) train-step graphs, 18 by default; a realistic
mix meets 12-16 of them (`bench/shapes.py`). The price is padding: under 2x of the tokens by construction
(about 1.5x on that mix), more of the vision patches. `--length_buckets` sets the token ladder by hand,
and `off` restores padding to multiples of 64 tokens / 256 patches (fewest padded values, a graph for
almost every batch).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_LENGTH_BUCKETS = 6
MULTIPLE = 64  # every token bucket is a multiple of this (kernel-friendly sizes)
UNBUCKETED_PATCH_MULTIPLE = 256
VISION_UNIT = 4  # patches per merged vision token (spatial_merge_size 2, all four families)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def default_ladder(largest: int) -> tuple[int, ...]:
    """largest, largest/2, ... (at most MAX_LENGTH_BUCKETS values, multiples of 64), ascending."""
    top = _round_up(max(largest, MULTIPLE), MULTIPLE)
    values = {_round_up(max(top >> k, MULTIPLE), MULTIPLE) for k in range(MAX_LENGTH_BUCKETS)}
    return tuple(sorted(values))


@dataclass(frozen=True)
class ShapeBuckets:
    """The token ladder a run pads to (ascending), or None for the unbucketed policy; the frame bound (0: none)."""

    tokens: tuple[int, ...] | None
    unit: int = VISION_UNIT
    frame_patches: int = 0

    @classmethod
    def from_flag(cls, flag: str, rows: int, model_max_length: int, frame_patches: int = 0) -> "ShapeBuckets":
        """`auto` (default ladder), `off`, or a comma list of token counts per micro-batch."""
        value = (flag or "auto").strip().lower()
        if value == "auto":
            return cls(default_ladder(rows * model_max_length), frame_patches=frame_patches)
        if value == "off":
            return cls(None, frame_patches=frame_patches)
        try:
            ladder = sorted({int(v) for v in value.split(",") if v.strip()})
        except ValueError:
            ladder = []
        if not ladder or ladder[0] <= 0:
            raise ValueError(f"--length_buckets {flag!r}: expected auto, off or positive token counts like 1024,4096")
        return cls(tuple(ladder), frame_patches=frame_patches)

    def token_count(self, n: int) -> int:
        """Padded tokens of a micro-batch with `n` (rows x longest row); past the ladder, its top's multiples."""
        if self.tokens is None:
            return _round_up(n, MULTIPLE)
        for value in self.tokens:
            if n <= value:
                return value
        return _round_up(n, self.tokens[-1])

    def row_length(self, rows: int, longest: int) -> int:
        """Padded length of each of `rows` rows whose longest has `longest` tokens (a multiple of 8)."""
        return _round_up(-(-self.token_count(rows * longest) // rows), 8)

    def patch_count(self, n: int, tokens: int) -> int:
        """Padded vision patches of a micro-batch of `tokens` padded tokens; 0 stays 0 (text-only graph)."""
        if n == 0:
            return 0
        if self.tokens is None:
            return _round_up(n, UNBUCKETED_PATCH_MULTIPLE)
        for value in (tokens, self.unit * tokens):
            if n <= value:
                return _round_up(value, self.unit)  # whole merge windows
        return _round_up(n, self.unit * tokens)

    def graphs(self) -> int | None:
        """Most train-step graphs these buckets allow (None: unbounded)."""
        return None if self.tokens is None else 3 * len(self.tokens)


def describe_buckets(buckets: ShapeBuckets) -> str:
    """One line for the start of a run: what micro-batches are padded to and the graphs that allows."""
    if buckets.tokens is None:
        return "shape buckets off (--length_buckets off): tokens to multiples of 64, patches to 256"
    sizes = ", ".join(str(t) for t in buckets.tokens)
    return (f"shape buckets: tokens per micro-batch {sizes}; vision patches none, x1 or x{buckets.unit} the tokens; "
            f"at most {buckets.graphs()} train-step graphs")
