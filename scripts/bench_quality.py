"""Digits quality benchmark: real held-out digits, the teacher with stock solvers, and the
distilled students, in one table measured in one run on one machine.

    python scripts/bench_quality.py --run runs/digits-dmd2-1step --run runs/digits-dmd2-2step \
        --run runs/digits-dmd2-4step --run runs/digits-dmd2-1step-long:best --out docs/quality.md

Rows: the 360 held-out real digits (the noise floor: real images the teacher never saw),
the teacher with DDIM (trailing spacing) and DPM-Solver++ at 1, 2, 4, 8, 25 and 50 steps,
and each student given by --run (RUN or RUN:CHECKPOINT, checkpoint 'latest', 'best' or a
directory; EMA weights). Columns: Fréchet distance, KID, precision and recall (k=3) against
the 1,437 training digits in the scoring classifier's features, class accuracy, latency of
one image and seconds per 1,000 samples (batch 500, median of 3 after warm-up). All
samples share one seed and balanced labels. Then the goals: the best 1-step student against
the teacher at 25 steps (its better solver) in FD, recall and speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from distill import evaluate
from distill.config import EvalConfig
from distill.data import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="models/digits-teacher")
    parser.add_argument("--classifier", default="models/digits-classifier")
    parser.add_argument("--run", action="append", default=[], help="RUN or RUN:CHECKPOINT (repeatable)")
    parser.add_argument("--teacher-steps", default=",".join(map(str, evaluate.BASELINE_STEPS)))
    parser.add_argument("--num", type=int, default=2000, help="samples per row")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=EvalConfig().batch_size)
    parser.add_argument("--cache-dir", default=EvalConfig().cache_dir, help="reference-feature cache")
    parser.add_argument("--out", default=None, help="write the table (markdown) here too")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    defaults = EvalConfig()
    scorer = evaluate.Scorer(feature_spaces=["classifier"], dataset="digits", classifier=args.classifier, dinov2="unused",
                             cache_dir=args.cache_dir, nearest_k=defaults.nearest_k, kid_subsets=defaults.kid_subsets,
                             kid_subset_size=defaults.kid_subset_size, batch_size=args.batch)
    rows = []

    def add(target: evaluate.Target | None, name: str, images, labels) -> None:
        row = {"name": name, **scorer(images, labels)}
        if target is not None:
            row.update(evaluate.measure_speed(target.draw, batch_size=args.batch, warmup=1, repeats=3))
        rows.append(row)
        print(evaluate.markdown_table([row], ["classifier"]).splitlines()[-1], flush=True)

    held_out, held_labels = load_digits("test")
    add(None, f"real held-out digits ({len(held_labels)})", (held_out + 1) / 2, held_labels)
    for steps in [int(s) for s in args.teacher_steps.split(",")]:
        for solver in evaluate.SOLVER_NAMES:
            target = evaluate.teacher_target(args.teacher, solver, steps, guidance_scale=1.0, batch_size=args.batch)
            add(target, target.name, *target.draw(args.num, args.seed, clamp=False))
    for spec in args.run:
        run, _, checkpoint = spec.partition(":")
        target, _ = evaluate.run_target(run, checkpoint or "latest", batch_size=args.batch)
        add(target, target.name, *target.draw(args.num, args.seed, clamp=False))

    header = (
        f"{args.num} samples per row (seed {args.seed}, balanced labels); reference: the 1,437 training digits in the "
        f"features of `{args.classifier}`; {torch.get_num_threads()} CPU threads, {platform.machine()}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.\n\n"
    )
    table = header + evaluate.markdown_table(rows, ["classifier"]) + goals(rows)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


def goals(rows: list[dict]) -> str:
    """The issue's three goals, read off the table: the best 1-step student against the
    teacher at 25 steps with its better solver."""
    teacher = [r for r in rows if r["name"].startswith("teacher") and r["name"].endswith(", 25 steps")]
    students = [r for r in rows if r["name"].startswith("student") and r["name"].endswith(", 1 step")]
    if not teacher or not students:
        return ""
    t = min(teacher, key=lambda r: r["fd_classifier"])
    s = min(students, key=lambda r: r["fd_classifier"])
    return (
        f"\nBest 1-step student ({s['name']}) against {t['name']}:\n\n"
        f"- FD {s['fd_classifier']:.3f} against {t['fd_classifier']:.3f} (goal: no worse): "
        f"{'met' if s['fd_classifier'] <= t['fd_classifier'] else 'not met'}\n"
        f"- recall {s['recall_classifier']:.3f} against {t['recall_classifier']:.3f}, ratio "
        f"{s['recall_classifier'] / t['recall_classifier']:.3f} (goal: at least 0.9): "
        f"{'met' if s['recall_classifier'] >= 0.9 * t['recall_classifier'] else 'not met'}\n"
        f"- speed-up {t['seconds_per_1000'] / s['seconds_per_1000']:.1f}x in seconds per 1,000 samples "
        f"(goal: at least 20x): {'met' if t['seconds_per_1000'] >= 20 * s['seconds_per_1000'] else 'not met'}\n"
    )


if __name__ == "__main__":
    main()
