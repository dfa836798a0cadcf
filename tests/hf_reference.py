"""Reference outputs of the transformers model (under mindnlp), computed in a child interpreter.

Importing mindnlp installs mindtorch's methods on `mindspore.Tensor` for the whole process, after which
native MindSpore cells fail ("Tensor must have device"). Parity tests therefore keep mindnlp out of the
pytest process: `reference_outputs` writes the inputs as .npz files, runs this file as a script, and reads
back logits, loss and (optionally) every parameter gradient, keyed by HF parameter name.

Gradients: under mindnlp, the full HF forward with `pixel_values` returns zero gradients for the whole vision
tower, although each piece differentiates correctly. The gradient pass therefore composes the same HF pieces
as HF's forward does (`get_image_features` / `get_video_features`, `masked_scatter` at the pad tokens, then
the model on `inputs_embeds`); logits and loss come from the plain forward. (Qwen2-VL / Qwen2.5-VL layout.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
MODEL_KEYS = ("input_ids", "labels", "position_ids", "attention_mask") + VISION_KEYS


@dataclass
class ReferenceJob:
    """One HF model's work: `cases` run through the model loaded from `model_dir` (gradients on `grad_cases`);
    `hf_save=(out_dir, seed, case)` also saves a fresh seeded HF model of the same config with
    `save_pretrained(out_dir)` and runs it on `case`."""

    model_dir: Path
    cases: dict[str, dict[str, np.ndarray | None]]
    grad_cases: tuple[str, ...] = ()
    hf_save: tuple[Path, int, str] | None = None


def reference_outputs(work_dir: Path, jobs: dict[str, ReferenceJob]) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """{job: {case: {"logits", "loss", "grad:<name>"...}, "hf_saved": {...}, "params": {name: shape}}}.

    All jobs share one child process (one mindnlp import).
    """
    requests = {}
    for job_name, job in jobs.items():
        job_dir = work_dir / job_name
        job_dir.mkdir(parents=True, exist_ok=True)
        for name, batch in job.cases.items():
            arrays = {k: v for k, v in batch.items() if k in MODEL_KEYS and v is not None}
            np.savez(job_dir / f"case_{name}.npz", **arrays)
        hf_save = [str(job.hf_save[0]), job.hf_save[1], job.hf_save[2]] if job.hf_save else None
        requests[job_name] = {"model_dir": str(job.model_dir), "cases": list(job.cases),
                              "grad_cases": list(job.grad_cases), "hf_save": hf_save}  # fmt: skip
    (work_dir / "request.json").write_text(json.dumps(requests), encoding="utf-8")
    proc = subprocess.run([sys.executable, __file__, str(work_dir)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"reference process failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    results = {}
    for job_name, job in jobs.items():
        names = list(job.cases) + (["hf_saved"] if job.hf_save else []) + ["params"]
        results[job_name] = {name: dict(np.load(work_dir / job_name / f"out_{name}.npz")) for name in names}
    return results


def _main(work_dir: Path) -> None:
    import mindnlp  # noqa: F401  (maps torch/transformers onto MindSpore)
    import torch
    import transformers
    from mindtorch.autograd import value_and_grad

    def load_case(job_dir: Path, name: str) -> dict:
        arrays = np.load(job_dir / f"case_{name}.npz")
        return {key: torch.tensor(arrays[key]) for key in arrays.files}

    def run(model, inputs: dict, grads: bool) -> dict[str, np.ndarray]:
        out = model(**inputs)
        result = {"logits": out.logits.detach().numpy(), "loss": np.float32(out.loss.item())}
        if grads:
            named = list(model.named_parameters())
            params = [p for _, p in named]
            grad_fn = value_and_grad(lambda: composed_forward(model, inputs).loss, params, attach_grads=False)
            _, values = grad_fn()
            result.update({f"grad:{n}": np.asarray(g.asnumpy()) for (n, _), g in zip(named, values)})
        return result

    def composed_forward(model, inputs: dict):
        inner = model.model
        embeds = inner.get_input_embeddings()(inputs["input_ids"])
        for pixel_key, grid_key, features, token in (
            ("pixel_values", "image_grid_thw", inner.get_image_features, model.config.image_token_id),
            ("pixel_values_videos", "video_grid_thw", inner.get_video_features, model.config.video_token_id),
        ):
            if pixel_key in inputs:
                feats = torch.cat(features(inputs[pixel_key], inputs[grid_key]))
                slots = (inputs["input_ids"] == token)[..., None].expand_as(embeds)
                embeds = embeds.masked_scatter(slots, feats)
        rest = {k: v for k, v in inputs.items() if k not in VISION_KEYS and k != "input_ids"}
        return model(inputs_embeds=embeds, **rest)

    requests = json.loads((work_dir / "request.json").read_text(encoding="utf-8"))
    for job_name, request in requests.items():
        job_dir = work_dir / job_name
        model_dir = Path(request["model_dir"])
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        cls = getattr(transformers, config["architectures"][0])
        model = cls.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
        np.savez(job_dir / "out_params.npz", **{n: np.array(p.shape) for n, p in model.named_parameters()})
        for name in request["cases"]:
            result = run(model, load_case(job_dir, name), name in request["grad_cases"])
            np.savez(job_dir / f"out_{name}.npz", **result)
        if request["hf_save"]:
            out_dir, seed, case = request["hf_save"]
            torch.manual_seed(seed)
            hf_config = transformers.AutoConfig.from_pretrained(model_dir)
            hf_config._attn_implementation = "eager"
            fresh = cls(hf_config).float().eval()
            fresh.save_pretrained(out_dir)
            np.savez(job_dir / "out_hf_saved.npz", **run(fresh, load_case(job_dir, case), False))


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
