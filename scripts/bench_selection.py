"""How well a run's best checkpoint is chosen: every kept checkpoint of a digits run scored on
fresh draws, and what each selection rule would have picked.

    python -m distill train recipes/digits-dmd2-1step-long.yaml output_dir=runs/sel train.keep_checkpoints=40
    python scripts/bench_selection.py --run runs/sel --out runs/sel/selection.md

Each checkpoint (``checkpoints/step-N/student``) is scored on ``--select-draws`` draws on the
seeds ``eval.rescore_top`` uses (seed + 1 + 1000 i) and on ``--truth-draws`` further draws on
seeds no score of the run uses (``--truth-seed`` + i), each of ``--num`` samples; its
periodic FD is the run's own (``scores.jsonl``, one draw on seed + 1). The rules: the lowest
periodic FD (``checkpoints/best`` without ``eval.rescore_top``), the lowest mean over the
selection draws among the N lowest periodic ones (``eval.rescore_top: N``), the last step, and
the oracle (the lowest truth). A rule is read by its pick's truth FD: the mean over draws it
was not chosen on.

One run's figures rest on one periodic draw per checkpoint, so the rules are also read by
rotation over the fresh draws (selection and truth together, all on seeds apart from the
periodic one): each draw in turn plays the periodic score, the next ``--select-draws`` the
rescore draws, the rest the truth; the table gives each rule's mean truth FD and its mean
excess over that rotation's oracle. ``--json`` keeps every draw's FD, and ``--from-json``
renders the tables from such a file without scoring again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from distill import evaluate, runs
from distill.checkpoints import checkpoint_step, listed_checkpoints
from distill.factories import scorer_from_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--classifier", default=None, help="the classifier to score in (default: the run's eval.classifier)")
    parser.add_argument("--num", type=int, default=None, help="samples per draw (default: the run's eval.num_samples)")
    parser.add_argument("--select-draws", type=int, default=3)
    parser.add_argument("--truth-draws", type=int, default=5)
    parser.add_argument("--truth-seed", type=int, default=50_000)
    parser.add_argument("--tops", default="1,3,5,8", help="shortlist sizes to read off")
    parser.add_argument("--batch", type=int, default=None, help="default: the run's eval.batch_size")
    parser.add_argument("--cache-dir", default=None, help="default: the run's eval.cache_dir")
    parser.add_argument("--out", default=None)
    parser.add_argument("--json", default=None, help="write every draw's FD here")
    parser.add_argument("--from-json", default=None, help="render the tables of an earlier --json, scoring nothing")
    args = parser.parse_args()
    tops = [int(k) for k in args.tops.split(",")]
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        finish(saved["rows"], tops, saved["header"], args)
        return

    torch.set_grad_enabled(False)
    config, _ = runs.load_config(args.run)
    e = config.eval
    metric = f"fd_{e.features[0]}"  # what the run ranks its checkpoints by
    periodic = {row["step"]: row[metric] for row in runs.read_rows(Path(args.run) / runs.SCORES)}
    e = replace(e, features=e.features[:1], clip=None, cmmd=False, classifier=args.classifier or e.classifier,
                cache_dir=args.cache_dir or e.cache_dir, batch_size=args.batch or e.batch_size,
                num_samples=args.num or e.num_samples)
    scorer = scorer_from_config(e, config.data.dataset, "cpu")  # the digits: their own reference set
    select_seeds = runs.rescore_seeds(config.seed, args.select_draws)
    truth_seeds = [args.truth_seed + i for i in range(args.truth_draws)]
    teacher = evaluate.run_teacher(config)
    rows, started = [], time.perf_counter()
    for checkpoint in listed_checkpoints(args.run):
        step = checkpoint_step(checkpoint)
        if step not in periodic:
            continue
        target = evaluate.student_target(teacher, config, checkpoint / runs.STUDENT, batch_size=e.batch_size,
                                         adapter=f"step{step}")

        def fd(seeds):
            return [scorer(*target.draw(e.num_samples, seed, clamp=False))[metric] for seed in seeds]

        rows.append(summarise({"step": step, "periodic": periodic[step], "select_draws": fd(select_seeds),
                               "truth_draws": fd(truth_seeds)}))
        print(f"step {step}: periodic {periodic[step]:.3f}, select {rows[-1]['select']:.3f}, "
              f"truth {rows[-1]['truth']:.3f} +- {rows[-1]['truth_sd']:.3f}", flush=True)
    if not rows:
        sys.exit(f"{args.run}: no kept checkpoint has a periodic score (train with eval.every and train.keep_checkpoints)")
    header = (f"`python scripts/bench_selection.py --run {args.run}` ({platform.machine()}, torch {torch.__version__}, "
              f"{(time.perf_counter() - started) / 60:.1f} min): {len(rows)} checkpoints, {e.num_samples} samples a draw, {metric}; "
              f"selection seeds {select_seeds}, truth seeds {truth_seeds}.")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=1) + "\n")
    finish(rows, tops, header, args)


def summarise(row: dict) -> dict:
    truth = row["truth_draws"]
    return {**row, "select": statistics.mean(row["select_draws"]), "truth": statistics.mean(truth),
            "truth_sd": statistics.stdev(truth) if len(truth) > 1 else 0.0}


def finish(rows: list[dict], tops: list[int], header: str, args) -> None:
    table = render(rows, tops, header) + rotations(rows, tops)
    print(table)
    if args.out:
        Path(args.out).write_text(table)


def pick(rows: list[dict], top: int) -> dict:
    """``eval.rescore_top: top``'s pick: the lowest selection mean among the ``top`` lowest periodic scores."""
    shortlist = sorted(rows, key=lambda r: (r["periodic"], r["step"]))[:top]
    return min(shortlist, key=lambda r: (r["select"], r["step"]))


def rules(rows: list[dict], tops: list[int]) -> list[tuple[str, dict]]:
    """Each selection rule and the row it picks."""
    named = [("lowest periodic (rescore_top 0)" if top == 1 else f"rescore_top {top}", pick(rows, top)) for top in tops]
    return named + [("lowest selection mean of all", min(rows, key=lambda r: r["select"])), ("last step", rows[-1]),
                    ("oracle (lowest truth)", min(rows, key=lambda r: r["truth"]))]


def render(rows: list[dict], tops: list[int], header: str) -> str:
    lines = [header, "", "| step | periodic FD | selection mean | truth mean | truth sd |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['step']} | {r['periodic']:.3f} | {r['select']:.3f} | {r['truth']:.3f} | {r['truth_sd']:.3f} |" for r in rows]
    lines += ["", "| rule | step | truth FD of its pick |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['step']} | {r['truth']:.3f} |" for name, r in rules(rows, tops)]
    return "\n".join(lines) + "\n"


def rotations(rows: list[dict], tops: list[int]) -> str:
    """The rules read by rotation over the fresh draws (the module docstring)."""
    draws = [r["select_draws"] + r["truth_draws"] for r in rows]
    count, num_select = len(draws[0]), len(rows[0]["select_draws"])
    if count < num_select + 2:
        return ""
    picked: dict[str, list[tuple[float, float]]] = {}
    for first in range(count):
        order = [(first + i) % count for i in range(count)]
        rotated = [summarise({"step": r["step"], "periodic": d[order[0]], "select_draws": [d[i] for i in order[1:1 + num_select]],
                              "truth_draws": [d[i] for i in order[1 + num_select:]]}) for r, d in zip(rows, draws)]
        oracle = min(r["truth"] for r in rotated)
        for name, row in rules(rotated, tops):
            picked.setdefault(name, []).append((row["truth"], row["truth"] - oracle))
    lines = ["", f"Rotated over the {count} fresh draws (one plays the periodic score, the next {num_select} the rescore "
             f"draws, the other {count - 1 - num_select} the truth; {count} rotations):", "",
             "| rule | mean truth FD of its pick | mean excess over the oracle | worst excess |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {statistics.mean(t for t, _ in got):.3f} | {statistics.mean(x for _, x in got):.3f} | "
              f"{max(x for _, x in got):.3f} |" for name, got in picked.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
