"""Per-device training memory of a plan (model config, world size, ZeRO stage, LoRA, dtype, tokens, recompute).

Model states follow what `qwenvl.parallel` and `qwenvl.train.optimizer` allocate, tensor by tensor
(`model_tensors`), with e = bytes of the compute dtype and N ranks:

- stage 0: weights e, gradients e, float32 master 4 (none for float32 weights: their own master), moments 8.
- stages 1-2: weights e whole, master + moments 12/N; gradients e whole (stage 2 reduce-scatters them
  after each micro-batch, but the backward graph returns them whole first).
- stage 3 (N > 1): every weight a layer reads through a weight source and of at least the persistence
  threshold (default 1e5 values) is a chunk: trainable ones float32 (also the master) 4/N, gradient e/N,
  moments 8/N; frozen ones e/N (the fused MoE expert tensors too). The rest (norms, biases, small
  tensors) follows stage 2.
  One layer's weights are gathered whole at a time, with their whole gradient in the backward pass.
- frozen weights (LoRA base, frozen towers) once, in the compute dtype.
- gradient accumulation (> 1 micro-batch) keeps the accumulated gradients beside the new ones.
- layer by layer (`qwenvl.train.layer_by_layer`): at stages 2-3 each stage's gradients (a decoder layer's, the
  head's, those of everything before the layers) are reduce-scattered when its backward pass ends, so only the
  largest stage's exist whole.

Activations per token and decoder layer, in elements of the compute dtype (Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", without the attention matrix, which flash/blocked
attention never stores; generalised to grouped KV heads and gated MLPs): the two norm inputs and outputs
4h, q and attention output 2*hq, k and v 2*kv, gate, up, act(gate) and their product 4*I (MoE: top_k
experts' 2h + 4*I_moe per token). Vision blocks likewise per patch. With recompute only each layer's
input h stays, plus one layer's activations while it is recomputed; layer by layer is this rule on every
device (on CPU the whole-model graph's recompute measured no saving). The logits exist one chunk of rows at a
time (`qwenvl.model.lm_loss`): float32 logits, probabilities, one-hot targets and their gradient, 16 bytes per
row and vocabulary entry.

Device terms: on Ascend a fixed allowance for the runtime, HCCL buffers and kernel workspace. On CPU (the
tests' backend) the process baseline measured here (Python + MindSpore + runtime), activations held in
float32 (half-precision models too: `qwenvl.model.layers.activation_dtype`) with the measured factor of
MindSpore's CPU kernels over the formula, and the float32 working copies of half-precision weights
(`qwenvl.model.weight_ops.HalfOnCPU`) per parameter of the layers a step runs (layer by layer: of the layers
outside the decoder and one decoder layer, which one compiled graph runs in turn). The CPU constants come from
`bench/memory.py` (see `tests/test_estimate_memory.py`); recompute measured no saving on CPU. Also on CPU, the
optimizer update's work space (`cpu_update`): the numpy AdamW (`qwenvl.train.host_adamw`) of ZeRO chunks and
small float32 tensors works in three float32 scratch arrays of its largest chunk (the all-gather that writes the
updated chunks back holds one bucket: `collectives.Collectives.all_gather_on_host`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qwenvl.model.lm_loss import chunk_rows
from qwenvl.parallel.model_tensors import ParamInfo, lora_tensors, model_tensors, text_settings, vision_settings

GiB = 2**30
MiB = 2**20
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DEVICES = ("ascend", "cpu")
ASCEND_RUNTIME_BYTES = 3 * GiB  # allowance: CANN runtime, HCCL buffers (HCCL_BUFFSIZE), kernel workspace
CPU_BASELINE_BYTES = 480 * MiB  # measured: Python + MindSpore import + runtime, before any weight
CPU_ACTIVATION_FACTOR = 1.64  # measured float32 activations of MindSpore's CPU kernels / the formula
CPU_HALF_COPY_BYTES = 2.0  # fitted (runs J-L): float32 working bytes per half-precision weight element a step runs
CPU_HALF_GRAD_BYTES = {"whole": 4.0, "chunk": 2.5}  # ... plus, for trainable weights, by gradient layout
CPU_HOST_ADAMW_LARGE = 2**18  # `qwenvl.train.optimizer.LARGE_TENSOR`: larger float32 tensors at world 1 take a kernel
PERSISTENCE_THRESHOLD = 100_000


@dataclass(frozen=True)
class Plan:
    """What the run does: `tokens` per micro-batch = seq_len * micro_batch; `vision_patches` per micro-batch."""

    world: int = 8
    stage: int = 0
    dtype: str = "bf16"
    seq_len: int = 8192
    micro_batch: int = 1
    accumulation: int = 1
    recompute: bool = True
    layer_by_layer: bool = False  # `--layer_by_layer`: recomputed, graphs and whole stage-2 gradients per layer
    device: str = "ascend"
    lora_r: int = 0  # 0: full fine-tune
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    tune_llm: bool = True
    tune_merger: bool = True
    tune_vision: bool = False
    vision_patches: int = 0
    persistence_threshold: int = PERSISTENCE_THRESHOLD

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0-3, not {self.stage}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, not {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if min(self.world, self.seq_len, self.micro_batch, self.accumulation) < 1:
            raise ValueError("world, seq_len, micro_batch and accumulation must be >= 1")

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch


@dataclass
class Estimate:
    """Bytes per device by kind; `total` is their sum."""

    params: int
    trainable: int
    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0  # float32 masters + moments
    activations: float = 0.0  # incl. logits
    zero3_gathered: float = 0.0
    workspace: float = 0.0  # one largest-tensor transient (optimizer's scaled gradient, save's host copy)
    runtime: float = 0.0  # process baseline (CPU) / runtime allowance (Ascend)
    cpu_half_copies: float = 0.0
    cpu_update: float = 0.0  # CPU: the host AdamW's scratch arrays (module docstring)
    notes: list[str] = field(default_factory=list)

    KINDS = ("weights", "gradients", "optimizer", "activations", "zero3_gathered", "workspace", "cpu_half_copies",
             "cpu_update", "runtime")  # fmt: skip

    @property
    def total(self) -> float:
        return sum(getattr(self, kind) for kind in self.KINDS)

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in self.KINDS}
        return {**out, "bytes": {kind: round(getattr(self, kind)) for kind in self.KINDS}, "total": round(self.total)}


def _stage(info: ParamInfo) -> str:
    """The compiled graph of a layer-by-layer step that computes the tensor's gradient: its decoder layer, the
    head (final norm, lm_head) or everything before the layers (embeddings, vision tower, mergers)."""
    if info.group.startswith("model.language_model.layers."):
        return info.group
    if info.name.startswith("lm_head.") or info.name.startswith("model.language_model.norm."):
        return "head"
    return "inputs"


def _trainable(info: ParamInfo, plan: Plan) -> bool:
    if ".lora_" in info.name:
        return True
    part = info.part
    wanted = {"vision": plan.tune_vision, "merger": plan.tune_merger, "llm": plan.tune_llm, "lm_head": plan.tune_llm}
    return bool(wanted[part]) and not (plan.lora_r and part in ("llm", "lm_head"))


def _layer_activation_elements(text: dict, index: int) -> float:
    """Elements per token a decoder layer keeps for backward (module docstring)."""
    h, hq, kv = text["hidden_size"], text["num_attention_heads"] * text["head_dim"], text["num_key_value_heads"] * text[
        "head_dim"]  # fmt: skip
    attention = 4 * h + 2 * hq + 2 * kv
    sparse = text.get("num_experts", 0) > 0 and index not in (text.get("mlp_only_layers") or []) and (
        (index + 1) % text.get("decoder_sparse_step", 1) == 0)  # fmt: skip
    if sparse:
        return attention + text["num_experts_per_tok"] * (2 * h + 4 * text["moe_intermediate_size"])
    return attention + 4 * text["intermediate_size"]


def _vision_activation_elements(vision: dict) -> float:
    dim, mlp = vision["dim"], vision["mlp"]
    return 4 * dim + 4 * dim + (4 if vision["gated"] else 2) * mlp


def _activations(config: dict, plan: Plan, e: int) -> tuple[float, str]:
    text = text_settings(config)
    layers = [_layer_activation_elements(text, i) for i in range(text["num_hidden_layers"])]
    vision = vision_settings(config)
    blocks = [_vision_activation_elements(vision)] * (vision["depth"] if plan.vision_patches else 0)
    cpu = plan.device == "cpu"  # float32 working values on CPU, measured factors (module docstring)
    if plan.layer_by_layer or (plan.recompute and not cpu):
        kept, working = (4, 4 * CPU_ACTIVATION_FACTOR) if cpu else (e, e)
        inputs = kept * (plan.tokens * text["hidden_size"] * len(layers)
                         + plan.vision_patches * vision["dim"] * len(blocks))
        one = working * max([plan.tokens * a for a in layers] + [plan.vision_patches * b for b in blocks])
        full = inputs + one
        how = f"{'layer by layer' if plan.layer_by_layer else 'recompute'}: layer inputs + one layer"
    elif cpu:
        bytes_per = 4 * CPU_ACTIVATION_FACTOR
        full = bytes_per * (plan.tokens * sum(layers) + plan.vision_patches * sum(blocks))
        how = "all layers kept (CPU: recompute measured no saving)"
    else:
        full = e * (plan.tokens * sum(layers) + plan.vision_patches * sum(blocks))
        how = "all layers kept"
    logits = 16 * chunk_rows(plan.tokens, text["vocab_size"]) * text["vocab_size"]
    return full + logits, f"activations: {how}; logits {logits / GiB:.2f} GiB"


def estimate(config: dict, plan: Plan) -> Estimate:
    """Bytes per device of `plan` for the model of HF `config` (module docstring for the rules)."""
    e = DTYPE_BYTES[plan.dtype]
    n = plan.world
    base = model_tensors(config)
    adapters = lora_tensors(base, plan.lora_r, plan.lora_targets) if plan.lora_r else []
    tensors = base + adapters
    trainable = [_trainable(t, plan) for t in tensors]
    result = Estimate(params=sum(t.numel for t in base),
                      trainable=sum(t.numel for t, train in zip(tensors, trainable) if train))
    partitioned = plan.stage >= 1 and n > 1
    accumulate = plan.accumulation > 1
    groups: dict[str, float] = {}
    whole_grads: dict[str, float] = {}  # per stage (`_stage`): the gradients that exist whole (stages 2-3)
    largest_local = 0.0
    host_chunk = 0.0  # CPU: the numpy AdamW's largest chunk
    for info, train in zip(tensors, trainable):
        size = info.numel
        sharded = plan.stage == 3 and n > 1 and info.matrix and size >= plan.persistence_threshold
        if sharded:
            groups[info.group] = groups.get(info.group, 0.0) + size * e * (2 if train else 1)
            if not train:
                result.weights += e * size / n
                continue
            result.weights += 4 * size / n
            result.gradients += e * size / n * (2 if accumulate else 1)
            result.optimizer += 8 * size / n
            largest_local = max(largest_local, size / n)
            host_chunk = max(host_chunk, size / n)
            continue
        result.weights += e * size
        if not train:
            continue
        share = n if partitioned else 1
        own_master = e == 4 and not partitioned
        result.optimizer += (8 if own_master else 12) * size / share
        chunk = size / n if plan.stage >= 2 and n > 1 else size
        if plan.layer_by_layer and chunk != size:  # reduce-scattered per layer: one layer's whole at a time
            whole_grads[_stage(info)] = whole_grads.get(_stage(info), 0.0) + e * size
            result.gradients += e * chunk * (2 if accumulate else 1)
        else:
            result.gradients += e * size + (e * chunk if accumulate else 0)
        largest_local = max(largest_local, size / share)
        if partitioned:
            host_chunk = max(host_chunk, size / n)
        elif e == 4 and size < CPU_HOST_ADAMW_LARGE:
            host_chunk = max(host_chunk, size)
    result.gradients += max(whole_grads.values(), default=0.0)
    result.zero3_gathered = max(groups.values(), default=0.0)
    largest_whole = max(t.numel for t in base)
    result.workspace = max(4 * largest_local, e * largest_whole)
    result.activations, how = _activations(config, plan, e)
    result.notes.append(how)
    if plan.device == "cpu":
        result.runtime = CPU_BASELINE_BYTES
        if e != 4:
            result.cpu_half_copies = _cpu_half_copies(tensors, trainable, plan)
        result.cpu_update = 3 * 4 * host_chunk
    else:
        result.runtime = ASCEND_RUNTIME_BYTES
    return result


def _cpu_half_copies(tensors: list[ParamInfo], trainable: list[bool], plan: Plan) -> float:
    """Float32 working bytes of half-precision weights on CPU, for the weights of the layers a step runs."""
    outside, per_layer = 0.0, {}
    for info, train in zip(tensors, trainable):
        if not info.matrix or (info.part in ("vision", "merger") and not plan.vision_patches):
            continue
        sharded = plan.stage == 3 and plan.world > 1 and info.numel >= plan.persistence_threshold
        value = info.numel * CPU_HALF_COPY_BYTES
        if train:
            value += info.numel * CPU_HALF_GRAD_BYTES["chunk" if sharded else "whole"]
        if plan.layer_by_layer and _stage(info) not in ("head", "inputs"):
            per_layer[info.group] = per_layer.get(info.group, 0.0) + value
        else:
            outside += value
    return outside + max(per_layer.values(), default=0.0)
