"""Packing fill ratio and speed: our global best-fit decreasing against upstream's chunked one.

    python bench/pack_fill.py [--samples 1000000] [--pack_length 4096] [--seed 0]

Upstream (`tools/pack_data.py`) runs best-fit decreasing on consecutive chunks of 256 samples; the
same BFD core is run here on those chunks, so the comparison isolates the chunking. Lengths are a
realistic supervised-fine-tuning mix (token counts as the pipeline reports them): short text-only
chats, single images, multi-image samples and videos.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwenvl.data.packing import best_fit_decreasing, pack_lengths  # noqa: E402

UPSTREAM_CHUNK = 256


def length_mix(n: int, pack_length: int, seed: int) -> list[int]:
    """Mixture of log-normal lengths: 30% text-only, 45% one image, 15% multi-image, 10% video."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(4, size=n, p=[0.30, 0.45, 0.15, 0.10])
    medians = np.array([180.0, 700.0, 1800.0, 2600.0])
    sigmas = np.array([0.7, 0.5, 0.4, 0.35])
    lengths = rng.lognormal(np.log(medians[kind]), sigmas[kind])
    return [int(x) for x in np.clip(lengths, 24, pack_length)]


def upstream_chunked_packs(lengths: list[int], pack_length: int) -> int:
    return sum(
        len(best_fit_decreasing(lengths[i : i + UPSTREAM_CHUNK], pack_length))
        for i in range(0, len(lengths), UPSTREAM_CHUNK)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--pack_length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lengths = length_mix(args.samples, args.pack_length, args.seed)
    total = sum(lengths)
    start = time.perf_counter()
    ours = pack_lengths(lengths, args.pack_length)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    chunked = upstream_chunked_packs(lengths, args.pack_length)
    chunked_s = time.perf_counter() - start
    chunked_fill = total / (chunked * args.pack_length)
    print(f"samples {args.samples}, pack_length {args.pack_length}, mean length {total / len(lengths):.0f} tokens")
    print(f"{'method':<28}{'packs':>10}{'fill ratio':>12}{'seconds':>10}")
    print(f"{'upstream chunked BFD (256)':<28}{chunked:>10}{chunked_fill:>12.4f}{chunked_s:>10.2f}")
    print(f"{'qwenvl-ms global BFD':<28}{ours.n_packs:>10}{ours.fill_ratio:>12.4f}{ours_s:>10.2f}")
    print(f"packs saved: {chunked - ours.n_packs} ({(chunked - ours.n_packs) / chunked:.2%}); "
          f"fill ratio gain {ours.fill_ratio - chunked_fill:+.4f}")


if __name__ == "__main__":
    main()
