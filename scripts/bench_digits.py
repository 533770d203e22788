"""Digits benchmark: the teacher with stock solvers vs distilled students, one table.

    python scripts/bench_digits.py --run runs/digits-dmd2-1step --out runs/digits-dmd2-1step/bench.md

Rows: the held-out real digits (the noise floor), the teacher with DDIM (trailing
spacing) and DPM-Solver++ at 1, 2, 4 and 25 steps, and each student given by --run (its
newest checkpoint, EMA weights). Columns: Fréchet distance to the training digits in the
scoring classifier's features, class accuracy of class-conditional samples, and
wall-clock seconds per 1,000 samples on this machine. All samples share one seed and
balanced labels. Prints the table as markdown and writes it to --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from distill.data import load_digits
from distill.evaluate import balanced_labels, load_classifier, sample_teacher, score_images, time_per_1000
from distill.export import load_run
from distill.students import FewStepSampler
from distill.teachers import load_teacher
from distill.trainer import generate

SOLVERS = {
    "DDIM": partial(DDIMScheduler.from_config, timestep_spacing="trailing"),
    "DPM-Solver++": partial(DPMSolverMultistepScheduler.from_config, algorithm_type="dpmsolver++"),
}


class _Solver:
    """A scheduler class stand-in that builds the solver with bench-specific options."""

    def __init__(self, build):
        self.from_config = build


def teacher_images(teacher, solver: str, steps: int, num: int, seed: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = balanced_labels(num, teacher.num_classes)
    chunks = []
    for start in range(0, num, batch):
        n = min(batch, num - start)
        noise = torch.randn((n, *teacher.sample_shape), generator=generator)
        cond = teacher.condition({"class_label": labels[start : start + n]})
        x0 = sample_teacher(teacher, _Solver(SOLVERS[solver]), steps, noise, cond, generator=generator)
        chunks.append(teacher.decode(x0))
    return torch.cat(chunks), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="models/digits-teacher")
    parser.add_argument("--classifier", default="models/digits-classifier")
    parser.add_argument("--run", action="append", default=[], help="a run directory (repeatable)")
    parser.add_argument("--teacher-steps", default="1,2,4,25")
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    classifier = load_classifier(args.classifier)
    reference = (load_digits("train")[0] + 1) / 2
    teacher = load_teacher(args.teacher)
    rows = []

    def add(name: str, images, labels, seconds) -> None:
        scores = score_images(images, labels, reference, classifier)
        rows.append((name, scores["fd"], scores.get("class_accuracy"), seconds))
        print(f"{name:40s} FD {scores['fd']:7.3f}  acc {scores.get('class_accuracy', float('nan')):.3f}  "
              f"s/1000 {seconds if seconds is not None else float('nan'):.3f}", flush=True)

    held_out, held_labels = load_digits("test")
    add(f"real held-out digits ({len(held_labels)})", (held_out + 1) / 2, held_labels, None)

    for steps in [int(s) for s in args.teacher_steps.split(",")]:
        for solver in SOLVERS:
            images, labels = teacher_images(teacher, solver, steps, args.num, args.seed, args.batch)
            seconds = time_per_1000(lambda n: teacher_images(teacher, solver, steps, n, args.seed, args.batch), 1000)
            add(f"teacher, {solver}, {steps} steps", images, labels, seconds)

    for run in args.run:
        config, checkpoint = load_run(run)
        student = type(teacher.denoiser).from_pretrained(checkpoint / "student", use_safetensors=True).eval()
        sampler = FewStepSampler(config["student"]["timesteps"], teacher.schedule)
        sample = lambda n: generate(teacher, student, sampler, n, args.seed, args.batch, "cpu")
        images, labels = sample(args.num)
        add(f"student {run} ({checkpoint.name}), {len(sampler)} step{'s' * (len(sampler) > 1)}", images, labels, time_per_1000(lambda n: sample(n)[0], 1000))

    header = (
        f"Digits benchmark: {args.num} samples per row (seed {args.seed}, balanced labels), FD to the "
        f"{len(reference)} training digits in the features of `{args.classifier}`; "
        f"{torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}.\n\n"
        "| sampler | FD ↓ | class accuracy ↑ | s / 1,000 samples |\n|---|---:|---:|---:|\n"
    )
    table = header + "".join(
        f"| {name} | {fd:.3f} | {'' if acc is None else f'{acc:.3f}'} | {'' if sec is None else f'{sec:.3f}'} |\n"
        for name, fd, acc, sec in rows
    )
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
