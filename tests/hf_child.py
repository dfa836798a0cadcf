"""Child-process references from transformers/peft under mindnlp (kept out of the pytest process, where
importing mindnlp would patch mindspore.Tensor for the native models).

    python tests/hf_child.py <work_dir>    # reads request.json and inputs.npz, writes out.npz
Requests: {"task": "peft_logits", "base": DIR, "adapter": DIR} -> logits of PeftModel(base, adapter);
          {"task": "generate", "base": DIR, "max_new_tokens": N} -> greedy `generate` new tokens;
          {"task": "logits", "base": DIR} -> logits, and the missing/unexpected keys of `from_pretrained`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


def run_child(work: Path, request: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "request.json").write_text(json.dumps(request), encoding="utf-8")
    np.savez(work / "inputs.npz", **{k: v for k, v in inputs.items() if k in INPUT_KEYS and v is not None})
    proc = subprocess.run([sys.executable, __file__, str(work)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"reference process failed:\n{proc.stderr[-4000:]}")
    return dict(np.load(work / "out.npz"))


def _main(work: Path) -> None:
    import mindnlp  # noqa: F401
    import torch
    import transformers

    request = json.loads((work / "request.json").read_text(encoding="utf-8"))
    arrays = np.load(work / "inputs.npz")
    inputs = {key: torch.tensor(arrays[key]) for key in arrays.files}
    config = json.loads((Path(request["base"]) / "config.json").read_text(encoding="utf-8"))
    model, info = getattr(transformers, config["architectures"][0]).from_pretrained(
        request["base"], output_loading_info=True
    )
    model.eval()
    if request["task"] == "logits":
        problems = [f"{kind}:{key}" for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") for key in info[kind]]
        out = {"logits": model(**inputs).logits.detach().numpy(), "problems": np.array(problems, dtype=str)}
    elif request["task"] == "peft_logits":
        import peft.utils.save_and_load as peft_io
        from peft import PeftModel
        from safetensors.numpy import load_file

        # mindnlp's patched safe_open rejects the `backend` argument newer safetensors passes; the file is
        # read with the numpy API instead, everything else is PeftModel.from_pretrained's own path.
        peft_io.safe_load_file = lambda path, device=None: {k: torch.tensor(v) for k, v in load_file(path).items()}

        model = PeftModel.from_pretrained(model, request["adapter"])
        out = {"logits": model(**inputs).logits.detach().numpy()}
    else:
        generated = model.generate(**inputs, max_new_tokens=request["max_new_tokens"], do_sample=False,
                                   eos_token_id=request["eos_token_ids"], pad_token_id=request["pad_token_id"])  # fmt: skip
        out = {"tokens": generated[0, inputs["input_ids"].shape[1] :].numpy()}
    np.savez(work / "out.npz", **out)


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
