"""Text generation with a native model: the prompt is encoded by the training pipeline, decoding is compiled.

The prompt is the sample with an empty assistant reply, cut where the reply's supervision starts, so
it is exactly the training-time context (template, vision tokens, positions). Each decoding step runs
the model on the whole sequence padded to `prompt + max_new_tokens` tokens: one shape, compiled once;
causal attention makes the right padding invisible to the positions that matter. Positions of new
tokens are recomputed with the family's rope function, so they equal what a cached decoder would use.
No KV cache: simple and exact, meant for evaluation of fine-tunes, not for serving. An answer that
reaches `max_new_tokens` without an end token is flagged (`Answer.hit_limit`): it may be cut.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from qwenvl.constants import IGNORE_INDEX
from qwenvl.data.annotations import Sample
from qwenvl.data.collators import collate_padded
from qwenvl.data.dataset import EncodedSample, SampleEncoder


@dataclass(frozen=True)
class Answer:
    text: str
    new_tokens: int
    hit_limit: bool  # no end token within max_new_tokens: the answer may be cut
    vision_tokens: int  # image and video tokens of the prompt: what the model saw


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


def encode_prompt(encoder: SampleEncoder, sample: Sample) -> EncodedSample:
    """The sample's conversation up to the start of a new (empty) assistant reply."""
    messages = list(sample.messages)
    if messages and messages[-1][0] == "assistant":
        messages = messages[:-1]
    full = encoder.encode(replace(sample, messages=[*messages, ("assistant", "")]))
    start = int(np.flatnonzero(full.labels != IGNORE_INDEX)[0])
    return replace(
        full,
        input_ids=full.input_ids[:start],
        labels=np.full(start, IGNORE_INDEX, np.int64),
        position_ids=full.position_ids[:, :start],
        seq_lens=[start],
    )


def pick_token(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> int:
    """Greedy, or temperature / top-k / top-p (nucleus) sampling from one logits row."""
    if not config.do_sample:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / max(config.temperature, 1e-6)
    if config.top_k > 0:
        kth = np.sort(scaled)[-min(config.top_k, scaled.size)]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if config.top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < config.top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


class Generator:
    """`generate(sample)` -> the new token ids; `answer(sample)` -> decoded text."""

    def __init__(self, model, encoder: SampleEncoder) -> None:
        self.model = model
        self.encoder = encoder
        self._forward = None
        self._names: list[str] = []

    def _logits(self, batch: dict) -> np.ndarray:
        import inspect

        import mindspore as ms

        if self._forward is None:
            model = self.model
            self._names = list(inspect.signature(model.logits).parameters)

            def forward(*inputs):
                return model.logits(*inputs)

            self._forward = ms.jit(forward)
        inputs = self.model.prepare_inputs(batch)
        last = max(self._names.index(name) for name in inputs)
        return self._forward(*[inputs.get(name) for name in self._names[: last + 1]]).asnumpy()

    def _positions(self, ids: np.ndarray, prompt: EncodedSample) -> np.ndarray:
        kwargs = {"second_per_grid_ts": prompt.second_per_grid_ts} if self.encoder.family == "qwen2.5vl" else {}
        special = self.encoder.special
        positions, _ = self.encoder.rope_index(
            self.encoder.settings.merge_size,
            ids[None, :],
            prompt.image_grid_thw,
            prompt.video_grid_thw,
            image_token_id=special.image_pad,
            video_token_id=special.video_pad,
            vision_start_token_id=special.vision_start,
            **kwargs,
        )
        return positions[:, 0, :]

    def generate(self, prompt: EncodedSample, config: GenerationConfig = GenerationConfig()) -> list[int]:
        self.model.set_train(False)
        rng = np.random.default_rng(config.seed)
        stop = {self.encoder.special.im_end, self.encoder.special.pad}
        n = len(prompt.input_ids)
        total = n + config.max_new_tokens
        ids = np.full(total, self.encoder.special.pad, np.int64)
        ids[:n] = prompt.input_ids
        new: list[int] = []
        for cur in range(n, total):
            step = replace(prompt, input_ids=ids, labels=np.full(total, IGNORE_INDEX, np.int64),
                           position_ids=self._positions(ids, prompt), seq_lens=[total])  # fmt: skip
            batch = collate_padded([step], pad_token_id=self.encoder.special.pad)
            token = pick_token(self._logits(batch)[0, cur - 1], config, rng)
            if token in stop:
                break
            ids[cur] = token
            new.append(token)
        return new

    def answer(self, sample: Sample, config: GenerationConfig = GenerationConfig()) -> Answer:
        prompt = encode_prompt(self.encoder, sample)
        tokens = self.generate(prompt, config)
        special = self.encoder.special
        return Answer(
            text=self.encoder.tokenizer.decode(tokens, skip_special_tokens=False),
            new_tokens=len(tokens),
            hit_limit=len(tokens) >= config.max_new_tokens,
            vision_tokens=int(np.isin(prompt.input_ids, [special.image_pad, special.video_pad]).sum()),
        )


def load_generator(model_dir: str, data_args=None, adapter_dir: str | None = None, dtype: str = "float32") -> Generator:
    """A generator over a local model folder (and optionally a LoRA adapter trained on it).

    Pixel limits come from `data_args` when given, else the defaults (the tools pass the model's own,
    `qwenvl.infer.model_source`); the adapter folder's tokenizer and template are used when it has them.
    """
    from pathlib import Path

    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.pipeline import build_encoder
    from qwenvl.data.processor_files import load_tokenizer
    from qwenvl.model import load_model

    model = load_model(model_dir, dtype=dtype)
    if adapter_dir is not None:
        from mindspore import Tensor

        from qwenvl.model.lora import merged_weights

        params = dict(model.parameters_and_names())
        merged, _, _ = merged_weights({name: p.asnumpy() for name, p in params.items()}, adapter_dir)
        for name, value in merged.items():
            params[name].set_data(Tensor(value))
    tokenizer = load_tokenizer(adapter_dir if adapter_dir and (Path(adapter_dir) / "tokenizer.json").is_file() else model_dir)
    encoder = build_encoder(model_dir, data_args or DataArguments(), tokenizer=tokenizer)
    return Generator(model, encoder)
