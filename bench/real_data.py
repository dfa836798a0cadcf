"""A real photo dataset through training: compiled graphs, compile time, step time and RSS over the run.

    python bench/real_data.py --steps 200                       # the run of issue 11 (tiny model)
    python bench/real_data.py --steps 200 --flags "--group_by_modality_length True"

What a new user does: ordinary photos of every size in class folders (here 30 resizings, 120 px to
2400 x 1800, of the three real images in ../shared/assets/media, one class each) through
`tools/convert_imagefolder.py`, plus questions about the two real videos there, then `train_qwen.py` on a
tiny random Qwen2.5-VL with the default pixel limits, batch 4, `--model_max_length 1024`, logging every
step. Printed from the run's train_log.jsonl: train-step graphs compiled and their compile time (the
trainer's own count), the shapes the data needs under the run's shape buckets (counted here,
independently, from the same epoch plans and sample sizes), median step time once warm, peak RSS, and
RSS growth from the first to the last 50 steps after the last new graph.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEDIA = ROOT.parent / "shared" / "assets" / "media"
PHOTOS = {"flower": "10095.png", "bird": "10149.png", "street": "COCO_train2014_000000580957.jpg"}
SIZES = ((120, 90), (2400, 1800), (320, 240), (1600, 1200), (480, 640), (2048, 1536), (800, 600), (300, 2000),
         (1024, 768), (1280, 720))  # fmt: skip
VIDEOS = ("v_TpB_zMG3XBA.mp4", "v_rBMQFpHspmo.mp4")
BATCH, MAX_LENGTH = 4, 1024


def make_dataset(root: Path, media: Path = MEDIA) -> Path:
    """Photos of mixed sizes in class folders -> convert_imagefolder.py, plus video questions; the registry path."""
    from PIL import Image

    photos = root / "photos"
    for name, source in PHOTOS.items():
        (photos / name).mkdir(parents=True, exist_ok=True)
        image = Image.open(media / source).convert("RGB")
        for i, size in enumerate(SIZES):
            image.resize(size).save(photos / name / f"{name}_{i}.jpg", quality=90)
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_imagefolder.py"), "--root", str(photos),
                    "--output_dir", str(root / "json"), "--name", "photos", "--split", "1,0,0"],
                   check=True, capture_output=True)  # fmt: skip
    (photos / "videos").mkdir()
    train = root / "json" / "train.json"
    items = json.loads(train.read_text())
    for i, video in enumerate(VIDEOS * 2):
        shutil.copy(media / video, photos / "videos" / f"{i}_{video}")
        question = ("What happens in this video?", "Describe the scene.")[i // len(VIDEOS)]
        turns = [{"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": "People outdoors."}]
        items.append({"video": f"videos/{i}_{video}", "conversations": turns})
    train.write_text(json.dumps(items, indent=1))
    return root / "json" / "registry.json"


def train_flags(model: Path, registry: Path, out: Path, steps: int, extra: list[str]) -> list[str]:
    return ["--model_name_or_path", str(model), "--dataset_registry", str(registry), "--dataset_use", "photos_train",
            "--output_dir", str(out), "--tune_mm_llm", "True", "--tune_mm_mlp", "True", "--tune_mm_vision", "True",
            "--per_device_train_batch_size", str(BATCH), "--model_max_length", str(MAX_LENGTH), "--max_steps",
            str(steps), "--logging_steps", "1", "--save_strategy", "no", "--learning_rate", "1e-4",
            "--disable_tqdm", "True", *extra]  # fmt: skip


def shapes_needed(flags: list[str]) -> set[tuple[int, int, int]]:
    """The (rows, length, patches) keys the run's micro-batches pad to, from sizes read off file headers."""
    from qwenvl.data.buckets import ShapeBuckets
    from qwenvl.data.grouping import dataset_sizes
    from qwenvl.data.pipeline import build_dataset, build_encoder
    from qwenvl.train.argument import parse_args
    from qwenvl.train.data_loader import epoch_plan

    _, data_args, args = parse_args(flags)
    encoder = build_encoder(Path(args_model(flags)), data_args, args.model_max_length)
    dataset = build_dataset(encoder, data_args, args.seed)
    tokens, patches = dataset_sizes(dataset)
    grouped = args.group_by_modality_length or args.group_by_length
    buckets = ShapeBuckets.from_flag(data_args.length_buckets, BATCH, args.model_max_length)
    keys, steps, epoch = set(), 0, 0
    while steps < args.max_steps:
        for step in epoch_plan(len(dataset), 0, 1, args.seed, epoch, BATCH, 1, (tokens, patches) if grouped else None):
            for micro in step:
                length = buckets.row_length(BATCH, int(tokens[micro].max()))
                keys.add((BATCH, length, buckets.patch_count(int(patches[micro].sum()), BATCH * length)))
            steps += 1
            if steps == args.max_steps:
                break
        epoch += 1
    return keys


def args_model(flags: list[str]) -> str:
    return flags[flags.index("--model_name_or_path") + 1]


@dataclass
class RunReport:
    steps: int
    graphs: int
    compile_s: float
    needed: int
    warm_step: int
    step_s: float
    peak_rss_mib: float
    rss_growth: float

    def lines(self) -> list[str]:
        return [f"steps {self.steps}; train-step graphs compiled {self.graphs} (shapes the data needs: {self.needed}); "
                f"compile time {self.compile_s:.1f} s",
                f"last new graph at step {self.warm_step}; median step {self.step_s * 1000:.0f} ms after it; "
                f"peak RSS {self.peak_rss_mib:.0f} MiB; RSS growth first -> last 50 warm steps "
                f"{self.rss_growth * 100:+.1f}%"]  # fmt: skip


def summarise(log: Path, needed: int) -> RunReport:
    records = [r for r in map(json.loads, log.read_text().splitlines()) if "step_time_s" in r]
    graphs = [int(r["graphs"]) for r in records]
    warm = next(i for i, g in enumerate(graphs) if g == graphs[-1])  # index of the record with the last new graph
    after = records[warm + 1 :]
    rss = [r["memory"]["rss_mib"] for r in after]
    window = min(50, max(1, len(rss) // 2))
    growth = float(np.mean(rss[-window:]) / np.mean(rss[:window]) - 1) if rss else float("nan")
    return RunReport(records[-1]["step"], graphs[-1], float(records[-1]["compile_s"]), needed, records[warm]["step"],
                     float(np.median([r["step_time_s"] for r in after])) if after else float("nan"),
                     max(r["memory"]["peak_rss_mib"] for r in records), growth)  # fmt: skip


def run(work: Path, steps: int, extra: list[str], family: str = "qwen2.5vl", media: Path = MEDIA) -> RunReport:
    """Build the data and a tiny model under `work`, train, and report (raises if training fails)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from make_tiny_model import make_tiny_model

    model = work / f"tiny-{family}"
    if not (model / "config.json").is_file():
        make_tiny_model(model, family, seed=0)
    registry = work / "json" / "registry.json"
    if not registry.is_file():
        make_dataset(work, media)
    out = work / "output"
    flags = train_flags(model, registry, out, steps, extra)
    result = subprocess.run([sys.executable, str(ROOT / "qwenvl" / "train" / "train_qwen.py"), *flags,
                             "--overwrite_output_dir", "True"], capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        tail = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        raise RuntimeError(f"train_qwen.py exited {result.returncode}:\n{tail}")
    return summarise(out / "train_log.jsonl", len(shapes_needed(flags)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--work", default="runs/bench_real_data", help="data, tiny model and run output")
    parser.add_argument("--flags", default="", help="extra train_qwen.py flags, quoted")
    args = parser.parse_args(argv)
    report = run(Path(args.work), args.steps, shlex.split(args.flags))
    print("\n".join(report.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
