"""Digits quality benchmark: real held-out digits, the teacher with stock solvers, and the
distilled students of every shipped digits recipe over several seeds, in one table measured
in one run on one machine.

    python scripts/bench_quality.py --recipes all --seeds 0,1,2 --train --jobs 2 --out docs/benchmarks-table.md
    python scripts/bench_quality.py --run runs/try --run runs/try:best          # a table for runs you trained

With ``--recipes``, each recipe ``recipes/<name>.yaml`` is trained once per seed into
``<runs-dir>/<name>-seed<k>`` (``--train``: the missing ones, ``--jobs`` processes at a time,
each with ``--threads`` torch threads; a run that exists is read as it is; without
``--train`` the seeds with no finished run are left out, and the seed table names the seeds
it read). Rows: the 360
held-out real digits (the noise floor: real images the teacher never saw), the teacher with
DDIM (trailing spacing) and DPM-Solver++ at ``--teacher-steps``, each recipe's seed-0
student (final EMA weights, with speed), then the seed table: mean and spread over the seeds
of FD, recall, class accuracy and pixels outside [-1, 1], training minutes, and each run's
last periodic FD against its best (stable: within 1.5x). Columns: Fréchet distance, KID,
precision and recall (k=3) against the 1,437 training digits in the scoring classifier's
features, class accuracy, pixel values outside [-1, 1], latency of one image and seconds
per 1,000 samples (batch 500, median of 3 after warm-up). All samples share one seed and
balanced labels. Each row is the mean over ``--draws`` disjoint draws of ``--num`` samples,
with FD's spread across them (FD sd): one 2,000-sample FD of one digits student ranged from
2.2 to 3.0 over four draws, more than most differences between recipes. Then the goals of
issue 11, read off the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from distill import evaluate
from distill.config import EvalConfig
from distill.data import load_digits

DIGITS_RECIPES = tuple(sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "recipes").glob("digits-*.yaml")))
STABLE = 1.5  # a run's last periodic FD within this factor of its best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="models/digits-teacher")
    parser.add_argument("--classifier", default="models/digits-classifier")
    parser.add_argument("--run", action="append", default=[], help="RUN or RUN:CHECKPOINT (repeatable)")
    parser.add_argument("--recipes", default="", help=f"comma-separated recipe names, or 'all' ({', '.join(DIGITS_RECIPES)})")
    parser.add_argument("--seeds", default="0", help="seeds of each recipe, e.g. 0,1,2")
    parser.add_argument("--runs-dir", default="runs/bench")
    parser.add_argument("--train", action="store_true", help="train the recipes' missing runs first")
    parser.add_argument("--jobs", type=int, default=1, help="training processes at a time")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per training process (default: cores / jobs)")
    parser.add_argument("--teacher-steps", default=",".join(map(str, evaluate.BASELINE_STEPS)))
    parser.add_argument("--num", type=int, default=2000, help="samples per draw")
    parser.add_argument("--draws", type=int, default=5, help="disjoint draws of --num samples per row, scored apart and averaged")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=EvalConfig().batch_size)
    parser.add_argument("--cache-dir", default=EvalConfig().cache_dir, help="reference-feature cache")
    parser.add_argument("--out", default=None, help="write the table (markdown) here too")
    args = parser.parse_args()

    recipes = list(DIGITS_RECIPES) if args.recipes == "all" else [r for r in args.recipes.split(",") if r]
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {name: [Path(args.runs_dir) / f"{name}-seed{seed}" for seed in seeds] for name in recipes}
    if args.train:
        train_all(runs, seeds, jobs=args.jobs, threads=args.threads or max(1, (os.cpu_count() or 2) // args.jobs))

    torch.set_grad_enabled(False)
    defaults = EvalConfig()
    scorer = evaluate.Scorer(feature_spaces=["classifier"], dataset="digits", classifier=args.classifier, dinov2="unused",
                             cache_dir=args.cache_dir, nearest_k=defaults.nearest_k, kid_subsets=defaults.kid_subsets,
                             kid_subset_size=defaults.kid_subset_size, batch_size=args.batch)
    rows = []

    def add(target: evaluate.Target | None, name: str, images, labels, speed: bool = True) -> dict:
        draws = args.draws if len(images) == args.num * args.draws else 1  # the held-out digits are one set
        row = {"name": name, **(scorer.over_draws(images, labels, draws) if draws > 1 else scorer(images, labels))}
        if target is not None and speed:
            row.update(evaluate.measure_speed(target.draw, batch_size=args.batch, warmup=1, repeats=3))
        print(evaluate.markdown_table([row], ["classifier"]).splitlines()[-1], flush=True)
        return row

    held_out, held_labels = load_digits("test")
    rows.append(add(None, f"real held-out digits ({len(held_labels)})", (held_out + 1) / 2, held_labels))
    for steps in [int(s) for s in args.teacher_steps.split(",") if s]:
        for solver in evaluate.SOLVER_NAMES:
            target = evaluate.teacher_target(args.teacher, solver, steps, guidance_scale=1.0, batch_size=args.batch)
            rows.append(add(target, target.name, *target.draw(args.num * args.draws, args.seed, clamp=False)))
    for spec in args.run:
        run, _, checkpoint = spec.partition(":")
        target, _ = evaluate.run_target(run, checkpoint or "latest", batch_size=args.batch)
        rows.append(add(target, target.name, *target.draw(args.num * args.draws, args.seed, clamp=False)))
    seed_rows = []
    for name, dirs in runs.items():
        trained = [(seed, run) for seed, run in zip(seeds, dirs) if (run / "metrics.json").is_file()]
        if not trained:  # without --train: the seeds trained so far, none here
            print(f"{name}: no finished run in {args.runs_dir} for seeds {args.seeds}; left out", flush=True)
            continue
        scored = []
        for i, (seed, run) in enumerate(trained):
            target, _ = evaluate.run_target(run, "latest", batch_size=args.batch)
            row = add(target, f"{name} seed {seed} ({target.steps} step{'s' * (target.steps > 1)})",
                      *target.draw(args.num * args.draws, args.seed, clamp=False), speed=i == 0)
            row.update(run_facts(run), seed=seed)
            scored.append(row)
        rows.append({**scored[0], "name": f"student {name}, seed {trained[0][0]}, {scored[0]['train_minutes']:.1f} min"})
        seed_rows.append(seed_summary(name, scored))

    header = (
        f"Each row: the mean over {args.draws} disjoint draws of {args.num} samples (one seed, {args.seed}, balanced labels; FD sd: "
        f"the spread of FD across the draws); reference: the 1,437 training digits in the "
        f"features of `{args.classifier}`; {torch.get_num_threads()} CPU threads for scoring, {platform.machine()}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.\n\n"
    )
    table = header + evaluate.markdown_table(rows, ["classifier"])
    if seed_rows:
        table += "\n" + seeds_table(seed_rows, seeds)
    table += goals(rows, seed_rows)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table)


def train_all(runs: dict[str, list[Path]], seeds: list[int], *, jobs: int, threads: int) -> None:
    """Train every missing run, ``jobs`` processes at a time, each with ``threads`` threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    commands = []
    for name, dirs in runs.items():
        for seed, run in zip(seeds, dirs):
            if not (run / "metrics.json").is_file():
                commands.append([sys.executable, "-m", "distill", "train", f"recipes/{name}.yaml", f"seed={seed}",
                                 f"output_dir={run}"] + (["resume=latest"] if (run / "checkpoints").is_dir() else []))

    def launch(command: list[str]) -> None:
        started = time.time()
        log = Path(command[6].removeprefix("output_dir=") + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            result = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT)
        print(f"{' '.join(command[3:])}: exit {result.returncode} after {(time.time() - started) / 60:.1f} min", flush=True)
        if result.returncode:
            raise SystemExit(f"training failed; see {log}")

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(launch, commands))


def run_facts(run: Path) -> dict:
    """Training minutes (metrics.json) and the periodic evaluations' last and best FD (scores.jsonl)."""
    metrics = json.loads((run / "metrics.json").read_text())
    scores = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines() if line.strip()]
    fds = [s["fd_classifier"] for s in scores]
    return {"train_minutes": metrics["train_minutes"], "train_steps": metrics["step"],
            "last_fd": fds[-1] if fds else None, "best_fd": min(fds) if fds else None}


def seed_summary(name: str, scored: list[dict]) -> dict:
    def spread(key: str) -> tuple[float, float]:
        values = [r[key] for r in scored]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    ratios = [r["last_fd"] / r["best_fd"] for r in scored if r["best_fd"]]
    return {"name": name, "fd": spread("fd_classifier"), "recall": spread("recall_classifier"),
            "accuracy": spread("class_accuracy"), "outside": spread("out_of_range"), "minutes": spread("train_minutes"),
            "steps": scored[0]["train_steps"], "worst_ratio": max(ratios) if ratios else None,
            "fds": [r["fd_classifier"] for r in scored], "seeds": [r["seed"] for r in scored]}


def seeds_table(summaries: list[dict], seeds: list[int]) -> str:
    lines = [f"Over seeds {', '.join(map(str, seeds))} where trained (final EMA student of each run):\n",
             "| recipe | steps trained | minutes | seeds | FD ↓ mean ± sd | FD per seed | recall ↑ | class acc. ↑ "
             "| outside [-1, 1] ↓ | last / best periodic FD (worst seed) |",
             "|---|---:|---:|---|---:|---|---:|---:|---:|---:|"]
    for s in summaries:
        ratio = f"{s['worst_ratio']:.2f} ({'stable' if s['worst_ratio'] <= STABLE else 'NOT stable'})" if s["worst_ratio"] else ""
        lines.append(f"| {s['name']} | {s['steps']:,} | {s['minutes'][0]:.1f} | {', '.join(map(str, s['seeds']))} | "
                     f"{s['fd'][0]:.2f} ± {s['fd'][1]:.2f} | "
                     f"{', '.join(f'{v:.2f}' for v in s['fds'])} | {s['recall'][0]:.3f} ± {s['recall'][1]:.3f} | "
                     f"{s['accuracy'][0]:.3f} | {s['outside'][0]:.1%} | {ratio} |")
    return "\n".join(lines) + "\n"


def goals(rows: list[dict], summaries: list[dict]) -> str:
    """Issue 11's goals read off the tables: against the teacher at 25 steps (its better solver)."""
    teacher = [r for r in rows if r["name"].startswith("teacher") and r["name"].endswith(", 25 steps")]
    if not teacher:
        return ""
    t = min(teacher, key=lambda r: r["fd_classifier"])
    by_name = {s["name"]: s for s in summaries}
    lines = [f"\nGoals, against {t['name']} (FD {t['fd_classifier']:.3f}, recall {t['recall_classifier']:.3f}):\n"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "not met"

    students = [r for r in rows if r["name"].startswith("student")]
    one_step = [s for s in summaries if "1step" in s["name"]]
    if one_step:
        best = min(one_step, key=lambda s: s["fd"][0])
        lines.append(f"- 1-step parity ({best['name']}, {best['minutes'][0]:.0f} min): FD {best['fd'][0]:.2f} (mean of seeds) "
                     f"against {t['fd_classifier']:.2f}: {verdict(best['fd'][0] <= t['fd_classifier'])}; recall "
                     f"{best['recall'][0]:.3f}, {best['recall'][0] / t['recall_classifier']:.2f}x the teacher's (goal 0.9x): "
                     f"{verdict(best['recall'][0] >= 0.9 * t['recall_classifier'])}")
    if "digits-dmd2-1step" in by_name:
        d = by_name["digits-dmd2-1step"]
        lines.append(f"- the main job (digits-dmd2-1step): FD {d['fd'][0]:.2f} against 2x the teacher's {2 * t['fd_classifier']:.2f}: "
                     f"{verdict(d['fd'][0] <= 2 * t['fd_classifier'])}; recall {d['recall'][0] / t['recall_classifier']:.2f}x: "
                     f"{verdict(d['recall'][0] >= 0.9 * t['recall_classifier'])}; class accuracy {d['accuracy'][0]:.3f} (goal "
                     f"0.95): {verdict(d['accuracy'][0] >= 0.95)}; outside [-1, 1] {d['outside'][0]:.1%} (goal 5%): "
                     f"{verdict(d['outside'][0] <= 0.05)}")
    for multi in ("digits-dmd2-2step", "digits-dmd2-4step"):
        if multi in by_name and "digits-dmd2-1step" in by_name:
            m, d = by_name[multi], by_name["digits-dmd2-1step"]
            lines.append(f"- steps help ({multi}, {m['minutes'][0]:.1f} min against the 1-step's {d['minutes'][0]:.1f}): FD "
                         f"{m['fd'][0]:.2f} against {d['fd'][0]:.2f}: {verdict(m['fd'][0] <= d['fd'][0])}; recall "
                         f"{m['recall'][0] / t['recall_classifier']:.2f}x: {verdict(m['recall'][0] >= 0.9 * t['recall_classifier'])}")
    dpm4 = [r for r in rows if r["name"] == "teacher, DPM-Solver++, 4 steps"]
    if "digits-ladd-1step" in by_name and dpm4:
        l = by_name["digits-ladd-1step"]
        lines.append(f"- LADD ({l['minutes'][0]:.1f} min): FD {l['fd'][0]:.2f} against the teacher's at 4 DPM-Solver++ steps "
                     f"{dpm4[0]['fd_classifier']:.2f}: {verdict(l['fd'][0] <= dpm4[0]['fd_classifier'])}")
    if summaries:
        unstable = [s["name"] for s in summaries if s["worst_ratio"] and s["worst_ratio"] > STABLE]
        lines.append(f"- stable across seeds (every run's last periodic FD within {STABLE}x its best): "
                     + ("met" if not unstable else f"not met for {', '.join(unstable)}"))
    if students:
        s = min(students, key=lambda r: r["fd_classifier"])
        if s.get("seconds_per_1000") and t.get("seconds_per_1000"):
            lines.append(f"- speed-up of {s['name']}: {t['seconds_per_1000'] / s['seconds_per_1000']:.1f}x in seconds per "
                         "1,000 samples")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
