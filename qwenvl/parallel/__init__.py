"""Data parallelism and ZeRO: the one place that knows about ranks, collectives and sharding.

- `world`: this process's rank and world size under msrun, small collectives (loss sums, stop flags).
- `layout`: how a tensor's values are cut into per-rank chunks (`ShardSpec`), the same for every stage.
- `collectives`: bucketed all-reduce / reduce-scatter / all-gather, with the CPU twin of ReduceScatter.
- `zero`: ZeRO stages 0-3, from `--zero_stage` or `--deepspeed`: optimizer slots and gradient traffic.
- `zero3`: weights held as chunks and gathered layer by layer inside the compiled step.
"""
