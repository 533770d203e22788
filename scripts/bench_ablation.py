"""Ablation on the digits benchmark: method x discriminator regulariser, at an equal number of
student steps.

    python scripts/make_random_dinov2.py     # once: the offline stand-in for DINOv2
    python scripts/bench_ablation.py --steps 300 --out docs/ablation.md

Methods: ADD (frozen DINOv2 discriminator + score distillation, recipes/digits-add-1step),
LADD (the teacher's own features, no distillation; digits-ladd-1step), DMD2 with its GAN
head on the fake score's bottleneck (the default recipe, digits-dmd2-1step) and DMD2 with
the DINOv2 discriminator (digits-dmd2-dinov2-1step), each recipe as shipped.
Regularisers: none, approximated R1 (APT; sigma 0.01) and exact R1, each with weight
--r1-weight. Every run trains a 1-step student from the same seed for --steps student
steps (so the table does not depend on how busy the machine was; the minutes column says
what each run cost here), is scored on 2,000 samples every 100 steps (scores.jsonl) and at the
end (FD, precision and recall in the digits classifier's features, class accuracy), the same
count both times, so the periodic and final FDs compare: on 500 or 1,000 samples FD reads higher
and noisier (docs/benchmarks.md). A run counts as stable when every logged loss is finite and
its final FD is within 1.5x of the best FD it reached. The dinov2 backbone here is a small randomly
initialised DINOv2 (scripts/make_random_dinov2.py), not DINOv2's weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = {  # name -> (recipe, overrides)
    "ADD": ("recipes/digits-add-1step.yaml", []),
    "LADD": ("recipes/digits-ladd-1step.yaml", []),
    "DMD2 + GAN (fake-score head)": ("recipes/digits-dmd2-1step.yaml", []),
    "DMD2 + DINOv2 discriminator": ("recipes/digits-dmd2-dinov2-1step.yaml", []),
}
REGULARISERS = {"none": "none", "approximated R1": "approximated", "R1": "exact"}


def run(recipe: str, overrides: list[str], out: Path, steps: int) -> dict:
    args = [sys.executable, "-m", "distill", "train", recipe, f"output_dir={out}", "train.max_minutes=null",
            f"train.max_steps={steps}", "eval.every=100", "eval.num_samples=2000",
            "train.sample_every=0", "train.checkpoint_every=100000", *overrides]
    started = time.time()
    result = subprocess.run(args, capture_output=True, text=True)
    seconds = time.time() - started
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}", "seconds": seconds}
    final = json.loads((out / "metrics.json").read_text())
    losses = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    finite = all(math.isfinite(v) for row in losses for k, v in row.items() if isinstance(v, float))
    best = min([s["fd_classifier"] for s in scores] + [final["fd_classifier"]])
    final["stable"] = finite and math.isfinite(final["fd_classifier"]) and final["fd_classifier"] <= 1.5 * best
    final["best_periodic_fd"] = min(s["fd_classifier"] for s in scores) if scores else None
    final["seconds"] = seconds
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="student steps per run")
    parser.add_argument("--r1-weight", type=float, default=1e-3)
    parser.add_argument("--runs", default="runs/ablation")
    parser.add_argument("--out", default=None, help="write the table (markdown) here too")
    args = parser.parse_args()

    lines = ["| method | regulariser | minutes | FD ↓ | precision ↑ | recall ↑ | class acc. ↑ | stable |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for method, (recipe, overrides) in METHODS.items():
        for reg_name, kind in REGULARISERS.items():
            slug = f"{method.split()[0].lower()}{'-dinov2' if 'DINOv2' in method else ''}-{kind}"
            out = Path(args.runs) / slug
            if (out / "ablation.json").is_file():  # a finished run: reuse its result
                result = json.loads((out / "ablation.json").read_text())
            else:
                reg = [f"method.gan.r1.kind={kind}", f"method.gan.r1.weight={args.r1_weight}", "method.gan.r1.sigma=0.01"]
                result = run(recipe, overrides + reg, out, args.steps)
                out.mkdir(parents=True, exist_ok=True)
                (out / "ablation.json").write_text(json.dumps(result, indent=2))
            if "error" in result:
                line = f"| {method} | {reg_name} | | | | | | failed: {result['error'][:80]} |"
            else:
                line = (f"| {method} | {reg_name} | {result['train_minutes']:.1f} | {result['fd_classifier']:.2f} | {result['precision_classifier']:.3f} | "
                        f"{result['recall_classifier']:.3f} | {result['class_accuracy']:.3f} | {'yes' if result['stable'] else 'no'} |")
            lines.append(line)
            print(line, flush=True)
    header = (
        f"{args.steps} student steps per run (minutes: its training time on {os.cpu_count()} CPU cores, {platform.machine()}, "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')} torch threads per run, one run at a time; only roughly comparable "
        "across machines), 1-step students, "
        f"seed 0, regulariser weight {args.r1_weight:g} (approximated R1: sigma 0.01); FD, precision and recall against the "
        f"1,437 training digits in the digits classifier's features on 2,000 samples; {time.strftime('%Y-%m-%d')}. "
        "The DINOv2 backbone is a randomly initialised 4-layer DINOv2 (scripts/make_random_dinov2.py), not DINOv2's weights.\n\n"
    )
    table = header + "\n".join(lines) + "\n"
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
