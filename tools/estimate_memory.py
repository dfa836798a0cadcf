"""Memory per device of a training plan, before taking the cards (rules: qwenvl/parallel/memory_estimate.py).

    python tools/estimate_memory.py --model ./models/Qwen2.5-VL-7B-Instruct --world 8 --zero_stage 2 \
        --dtype bf16 --seq_len 8192 --micro_batch 1 --recompute
    python tools/estimate_memory.py --model Qwen/Qwen3-VL-8B-Instruct --world 8 --zero_stage 3 --json
    python tools/estimate_memory.py --recipes            # every scripts/sft_*.sh on 8 cards of 64 GB and 32 GB
    python tools/estimate_memory.py --recipes --json     # the same as JSON
    python tools/estimate_memory.py --recipes --markdown # the README's recipe table

`--model` is a folder with config.json, a config.json, or one of the known public configs below (no hub
access needed). Tokens per micro-batch are `--seq_len` x `--micro_batch` (with --data_flatten the
micro-batch is one row of that many tokens); `--vision_patches` adds vision-tower activations.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwenvl.parallel.memory_estimate import GiB, Estimate, Plan, estimate  # noqa: E402

_QWEN25_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                  "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"}  # fmt: skip
_QWEN3_VISION = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "patch_size": 16,
                 "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304,
                 "deepstack_visual_indexes": [8, 16, 24]}  # fmt: skip
_ROPE = {"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
# The public config.json numbers of the shipped recipes' models (Hugging Face repo id as the key).
KNOWN_CONFIGS = {
    "Qwen/Qwen2.5-VL-3B-Instruct": {
        "model_type": "qwen2_5_vl", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
        **_ROPE, "vision_config": {**_QWEN25_VISION, "out_hidden_size": 2048}},
    "Qwen/Qwen2.5-VL-7B-Instruct": {
        "model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
        **_ROPE, "vision_config": {**_QWEN25_VISION, "out_hidden_size": 3584}},
    "Qwen/Qwen3-VL-4B-Instruct": {
        "model_type": "qwen3_vl",
        "text_config": {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                        "tie_word_embeddings": True},
        "vision_config": {**_QWEN3_VISION, "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                          "out_hidden_size": 2560, "deepstack_visual_indexes": [5, 11, 17]}},
    "Qwen/Qwen3-VL-8B-Instruct": {
        "model_type": "qwen3_vl",
        "text_config": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                        "tie_word_embeddings": False},
        "vision_config": {**_QWEN3_VISION, "out_hidden_size": 4096}},
    "Qwen/Qwen3-VL-30B-A3B-Instruct": {
        "model_type": "qwen3_vl_moe",
        "text_config": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
                        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
                        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                        "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False},
        "vision_config": {**_QWEN3_VISION, "out_hidden_size": 2048}},
}  # fmt: skip
RECIPES = {  # script -> the model its MODEL_PATH default names
    "sft_qwen2.5vl_3b.sh": "Qwen/Qwen2.5-VL-3B-Instruct",
    "sft_qwen2.5vl_7b.sh": "Qwen/Qwen2.5-VL-7B-Instruct",
    "sft_qwen3vl_4b.sh": "Qwen/Qwen3-VL-4B-Instruct",
    "sft_qwen3vl_8b.sh": "Qwen/Qwen3-VL-8B-Instruct",
    "sft_qwen3vl_30b_a3b_lora.sh": "Qwen/Qwen3-VL-30B-A3B-Instruct",
}
CARDS_GB = (64, 32)


def load_config(model: str) -> dict:
    """A model folder or config.json path when it exists, else a known repo id (or a path ending in its name).

    ValueError naming the path when it is neither."""
    path = Path(model)
    path = path / "config.json" if path.is_dir() else path
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable config.json ({exc})") from exc
    for repo, config in KNOWN_CONFIGS.items():
        if model == repo or Path(model).name == repo.split("/")[1]:
            return config
    raise ValueError(f"{model}: no config.json there and not a known config ({', '.join(KNOWN_CONFIGS)})")


def _flags(*texts: str) -> dict[str, str]:
    """`--name value` pairs of launch scripts (later ones win), `$VAR` resolved by the `VAR="${VAR:-default}"`
    defaults (later scripts' defaults win, as when a recipe script sets them before calling sft.sh)."""
    flags: dict[str, str] = {}
    defaults: dict[str, str] = {}
    for text in texts:
        text = re.sub(r"#[^\n]*", "", text)
        flags.update(re.findall(r"--(\w+)\s+(\$\(\([^)]*\)\)|\"[^\"]*\"|\S+)", text))
        defaults.update(re.findall(r"(\w+)=\"\$\{\w+:-([^}]*)\}\"", text))
    for name, value in flags.items():
        match = re.fullmatch(r"\"?\$\{?(\w+)(?::-([^}]*))?\}?\"?", value)
        if match:
            flags[name] = defaults.get(match.group(1), match.group(2) or "")
    return flags


def _pixels(value: str) -> int:
    return int(eval(value.strip("$()"), {"__builtins__": {}}))  # the scripts' $((256 * 32 * 32)) products


def recipe_plan(script: Path, world: int = 8) -> tuple[str, Plan]:
    """The model and plan a shipped script launches: its flags over sft.sh's (batch, length, LoRA, ZeRO stage)."""
    flags = _flags((script.parent / "sft.sh").read_text(), script.read_text())
    config = KNOWN_CONFIGS[RECIPES[script.name]]
    patch = 16 if config["model_type"].startswith("qwen3") else 14
    lora = flags.get("lora_enable") == "True"
    batch = int(flags["per_device_train_batch_size"])
    stage = re.sub(r"\D", "", flags.get("zero_stage", "0")) or "0"
    plan = Plan(world=world, stage=int(stage), dtype="bf16", seq_len=int(flags["model_max_length"]), micro_batch=batch,
                accumulation=int(flags["gradient_accumulation_steps"]),
                recompute=flags.get("gradient_checkpointing") == "True", device="ascend",
                lora_r=int(flags["lora_r"]) if lora else 0, tune_llm=flags.get("tune_mm_llm") == "True",
                tune_merger=flags.get("tune_mm_mlp") == "True", tune_vision=flags.get("tune_mm_vision") == "True",
                vision_patches=batch * _pixels(flags["max_pixels"]) // patch**2)  # fmt: skip
    return RECIPES[script.name], plan


def max_tokens_that_fit(config: dict, plan: Plan, card_gb: float) -> int:
    """The most tokens per micro-batch (multiples of 256) that fit on a card of `card_gb` GB (GiB), 0 if none."""
    low, high = 0, plan.tokens

    def fits(tokens: int) -> bool:
        return estimate(config, replace(plan, seq_len=tokens, micro_batch=1)).total <= card_gb * GiB

    while low < high:
        mid = (low + high + 256) // 512 * 256
        if mid <= low:
            break
        low, high = (mid, high) if fits(mid) else (low, mid - 256)
    return low


def chosen_stage(config: dict, plan: Plan, card_gb: float = 64.0) -> int:
    """The recipes' rule: the lowest ZeRO stage that holds a whole micro-batch of maximum-length samples on a
    card of `card_gb` (fewer collectives than a higher one), else the stage that holds the most tokens."""
    room = {stage: max_tokens_that_fit(config, replace(plan, stage=stage), card_gb) for stage in range(4)}
    enough = [stage for stage, tokens in room.items() if tokens >= plan.seq_len * plan.micro_batch]
    return enough[0] if enough else max(room, key=lambda stage: (room[stage], -stage))


def describe(result: Estimate) -> str:
    parts = ", ".join(f"{kind} {value / GiB:.2f}" for kind, value in result.as_dict()["bytes"].items() if value)
    return f"{result.total / GiB:.1f} GiB ({parts})"


def recipe_rows() -> list[dict]:
    """Every shipped recipe: its plan, the estimate, and per card size whether it fits and how many tokens do."""
    rows = []
    for name in RECIPES:
        repo, plan = recipe_plan(ROOT / "scripts" / name)
        config = KNOWN_CONFIGS[repo]
        result = estimate(config, plan)
        cards = {card: {"fits": result.total <= card * GiB, "max_tokens": max_tokens_that_fit(config, plan, card)}
                 for card in CARDS_GB}  # fmt: skip
        mode = f"LoRA r={plan.lora_r}" if plan.lora_r else "full (LLM + merger)"
        rows.append({"script": name, "model": repo, "mode": mode, "plan": plan, "result": result,
                     "chosen_stage": chosen_stage(config, plan), "cards": cards})  # fmt: skip
    return rows


def print_recipes(rows: list[dict]) -> None:
    for row in rows:
        plan = row["plan"]
        print(f"{row['script']}: {row['model']}, {row['mode']}, ZeRO {plan.stage}, {plan.world} cards, {plan.tokens} "
              f"tokens per micro-batch (batch {plan.micro_batch} x {plan.seq_len}), accumulation {plan.accumulation}")
        print(f"  {describe(row['result'])}")
        for card, verdict in row["cards"].items():
            print(f"  {card} GB: {'fits' if verdict['fits'] else 'does NOT fit'}; "
                  f"at most {verdict['max_tokens']} tokens per micro-batch fit")  # fmt: skip
        if row["chosen_stage"] != plan.stage:
            print(f"  the script's stage {plan.stage} is not the lowest that holds one {plan.seq_len}-token "
                  f"sample on a 64 GB card: use ZeRO stage {row['chosen_stage']}")  # fmt: skip


def print_recipe_table(rows: list[dict]) -> None:
    """The README's recipe table."""
    print("| Script | Model | Trains | ZeRO | GiB per card (batch x max length) | 64 GB cards | 32 GB cards |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{'yes' if v['fits'] else 'no'}, up to {v['max_tokens']} tokens" for v in row["cards"].values()]
        total = f"{row['result'].total / GiB:.1f} ({row['plan'].tokens} tokens)"
        print(f"| `{row['script']}` | {row['model'].split('/')[1]} | {row['mode']} | {row['plan'].stage} | {total} | "
              f"{cells[0]} | {cells[1]} |")


def recipes_json(rows: list[dict]) -> list[dict]:
    return [{**{k: v for k, v in row.items() if k not in ("plan", "result")}, "plan": asdict(row["plan"]),
             "estimate": row["result"].as_dict()} for row in rows]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder, config.json, or known config: " + ", ".join(KNOWN_CONFIGS))
    parser.add_argument("--world", type=int, default=8, help="data-parallel ranks")
    parser.add_argument("--zero_stage", type=int, default=0, choices=(0, 1, 2, 3))
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--seq_len", type=int, default=8192, help="tokens per sequence")
    parser.add_argument("--micro_batch", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--recompute", action="store_true", help="gradient checkpointing")
    parser.add_argument("--layer_by_layer", action="store_true", help="train_qwen.py --layer_by_layer (recomputed, one "
                                                                        "layer's graph and whole gradients at a time)")
    parser.add_argument("--lora_r", type=int, default=0, help="LoRA rank (0: full fine-tune)")
    parser.add_argument("--lora_targets", default="q_proj,k_proj,v_proj,o_proj")
    parser.add_argument("--tune", default="llm,merger", help="comma list of trained parts: llm, merger, vision")
    parser.add_argument("--vision_patches", type=int, default=0, help="vision patches per micro-batch")
    parser.add_argument("--device", default="ascend", choices=("ascend", "cpu"))
    parser.add_argument("--card_gb", type=float, default=64.0, help="memory per card (GiB) for the verdict")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--recipes", action="store_true", help="every shipped recipe on 8 cards of 64 and 32 GB")
    parser.add_argument("--markdown", action="store_true", help="with --recipes: the README table")
    args = parser.parse_args(argv)
    if args.recipes:
        rows = recipe_rows()
        if args.json:
            print(json.dumps(recipes_json(rows), indent=2))
        elif args.markdown:
            print_recipe_table(rows)
        else:
            print_recipes(rows)
        return 0
    if not args.model:
        parser.error("--model or --recipes is required")
    tune = {part.strip() for part in args.tune.split(",") if part.strip()}
    try:
        plan = Plan(world=args.world, stage=args.zero_stage, dtype=args.dtype, seq_len=args.seq_len,
                    micro_batch=args.micro_batch, accumulation=args.accumulation, recompute=args.recompute,
                    layer_by_layer=args.layer_by_layer,
                    device=args.device, lora_r=args.lora_r, lora_targets=tuple(args.lora_targets.split(",")),
                    tune_llm="llm" in tune, tune_merger="merger" in tune, tune_vision="vision" in tune,
                    vision_patches=args.vision_patches)  # fmt: skip
        result = estimate(load_config(args.model), plan)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"error: {args.model}: the config has no {exc} field a Qwen-VL config needs", file=sys.stderr)
        return 2
    fits = result.total <= args.card_gb * GiB
    if args.json:
        print(json.dumps({**result.as_dict(), "card_gb": args.card_gb, "fits": fits}, indent=2))
    else:
        print(f"{args.model}: {result.params / 1e9:.2f} B parameters, {result.trainable / 1e9:.3f} B trainable")
        for kind, value in result.as_dict()["bytes"].items():
            print(f"  {kind:<16}{value / GiB:8.2f} GiB")
        print(f"  {'total':<16}{result.total / GiB:8.2f} GiB: {'fits' if fits else 'does NOT fit'} "
              f"a {args.card_gb:g} GB card; {'; '.join(result.notes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
