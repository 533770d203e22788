"""``distill train | export | sample | eval | validate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill import config as config_lib
from distill.config.device import check_device
from distill.errors import user_errors


def _validate(args) -> None:
    if args.keys:
        rows = [row for row in config_lib.describe() if not row[0].startswith("method.")]
        for key, help, default in rows:
            print(f"{key} = {default!r}\n    {help}")
        for name, method_rows in config_lib.describe_methods().items():
            print(f"\nmethod.name = {name!r}:")
            for key, help, default in method_rows[1:]:
                print(f"{key} = {default!r}\n    {help}")
        return
    if args.recipe is None:
        raise SystemExit("distill validate: give a recipe (or --keys)")
    config = config_lib.load(args.recipe, args.overrides)
    check_device(config, args.recipe)  # whether it would train here
    if args.print:
        import yaml

        print(yaml.safe_dump(config_lib.to_dict(config), sort_keys=False), end="")
    print(f"{args.recipe}: ok")


def _train(args) -> None:
    from distill.train import main

    main([args.recipe, *args.overrides])


def _export(args) -> None:
    from distill import runs
    from distill.export import export

    prompts = None
    if args.formats and "lora-extract" in args.formats:  # the distance's images: a text teacher needs prompts
        prompts = _prompts(args, runs.load_config(args.run_dir)[0])
    out = export(args.run_dir, args.out_dir, checkpoint=args.checkpoint, formats=args.formats, rank=args.rank, prompts=prompts)
    print(f"exported {args.run_dir} -> {out}")


def _prompts(args, run: config_lib.Config | None) -> list[str] | None:
    """Prompts for a text-to-image target: --prompts, else a run's own training data's."""
    from distill.data import PromptDataset

    if args.prompts:
        return PromptDataset(args.prompts).prompts
    if run is not None and run.data.dataset in ("prompts", "image_captions"):  # digits and classes have none
        return PromptDataset(run.data.path, split=run.data.split, column=run.data.prompt_column).prompts
    return None


def _target(args, device):
    """A run directory, an export, or (with --solver) a teacher pipeline, as evaluation targets."""
    from distill import evaluate, runs

    source = Path(args.target)
    if runs.is_run(source):
        if args.solver:
            raise SystemExit(f"distill {args.command}: --solver samples a teacher pipeline; {source} is a run directory")
        prompts = _prompts(args, runs.load_config(source)[0])
        target, config = evaluate.run_target(source, args.checkpoint, args.steps, batch_size=args.batch_size, device=device,
                                             prompts=prompts)
        return [target], config
    prompts = _prompts(args, None)
    if (source / "model_index.json").is_file() or (args.solver and not source.exists()):
        if not args.solver:
            return [evaluate.export_target(source, args.steps, batch_size=args.batch_size, device=device, prompts=prompts)], None
        solvers = list(evaluate.SOLVER_NAMES) if args.solver == "all" else [args.solver]
        steps = [args.steps] if args.steps else list(evaluate.BASELINE_STEPS)
        return [
            evaluate.teacher_target(str(args.target), solver, n, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                                    device=device, prompts=prompts)
            for n in steps for solver in solvers
        ], None
    raise FileNotFoundError(
        f"{source.resolve()} is neither a run directory (config.yaml) nor a pipeline directory (model_index.json); "
        "a teacher on the Hub needs --solver"
    )


def _sample(args) -> None:
    """Draw a grid from a run directory (its newest checkpoint), an export, or a teacher with --solver."""
    from distill.grids import save_grid

    targets, _ = _target(args, "cpu")
    images, _ = targets[0].draw(args.num, args.seed)
    save_grid(images, args.out)
    print(f"wrote {args.out} ({args.num} samples, {targets[0].steps} steps)")


def _eval(args) -> None:
    """Scores, speed, a markdown table and a sample grid for each target."""
    import json

    import torch

    from distill import evaluate
    from distill.factories import dataset_from_config, eval_reference, scorer_from_config
    from distill.grids import save_grid

    if args.draws < 1:
        raise SystemExit(f"distill eval: --draws {args.draws}; give 1 or more draws")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    targets, run_config = _target(args, device)
    overrides = [f"{key}={value}" for key, value in (("eval.num_samples", args.num), ("eval.features", args.features),
                                                     ("eval.classifier", args.classifier), ("eval.dinov2", args.dinov2),
                                                     ("eval.clip", args.clip), ("eval.cache_dir", args.cache_dir),
                                                     ("eval.cmmd", "true" if args.cmmd else None)) if value is not None]
    if args.reference:
        overrides += ["data.dataset=image_captions", f"data.path={args.reference}"]
    if run_config is not None:  # the run's own eval settings, then the command line's
        overrides = [f"{k}={json.dumps(v)}" for k, v in _flat_eval(run_config)] + overrides
    config = config_lib.load_eval(overrides, source=f"distill eval {args.target}")
    out = Path(args.out or (Path(args.target) / "eval" if run_config is not None else Path("eval") / Path(args.target).name))
    out.mkdir(parents=True, exist_ok=True)
    rows, scorer = [], None
    for target in targets:
        images, labels = target.draw(config.eval.num_samples * args.draws, args.seed, clamp=False)
        if scorer is None:  # the reference images of an image-caption set come at the targets' size
            reference = None
            if config.data.dataset == "image_captions":
                reference = eval_reference(dataset_from_config(config.data, resolution=images.shape[-1]), config.eval)
            elif config.data.dataset in ("prompts", "classes") and (config.eval.features or config.eval.cmmd):
                raise ValueError(f"{config.data.dataset} data have no reference images for FD or CMMD: score with --features "
                                 "[] (and --clip for prompts), or give --reference")
            scorer = scorer_from_config(config.eval, config.data.dataset, device, reference=reference)
        scores = scorer.over_draws(images, labels, args.draws) if args.draws > 1 else scorer(images, labels)
        row = {"name": target.name, "steps": target.steps, **scores}
        if not args.no_speed:
            row.update(evaluate.measure_speed(target.draw, batch_size=config.eval.batch_size, device=device))
        rows.append(row)
        slug = target.name.replace(", ", "-").replace(" ", "_").replace("(", "").replace(")", "").replace("/", "_")
        save_grid(images[:64], out / f"grid-{slug}.png")
        print(json.dumps(row), flush=True)
    if run_config is not None or (Path(args.target) / "model_index.json").is_file():
        _teacher_beside_student(args, targets[0], device, out)
    table = evaluate.markdown_table(rows, config.eval.features)
    (out / "metrics.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "metrics.md").write_text(table)
    print("\n" + table + f"\nwrote {out}/metrics.json, metrics.md and sample grids")


def _teacher_beside_student(args, student, device, out: Path) -> None:
    """``teacher-vs-student.png``: the teacher under --compare-solver at --compare-steps (its
    own guidance) | the student, the same --compare-num seeds and labels or prompts."""
    import yaml

    from distill import evaluate, runs
    from distill.export import RECIPE_FILE
    from distill.grids import save_picture, side_by_side

    if args.compare_num == 0:
        return
    source = Path(args.target)
    recipe_file = source / runs.CONFIG if runs.is_run(source) else source / RECIPE_FILE
    if not recipe_file.is_file():
        print(f"no teacher | student grid: {source} has no {recipe_file.name} naming its teacher")
        return
    teacher = yaml.safe_load(recipe_file.read_text())["teacher"]
    prompts = _prompts(args, runs.load_config(source)[0] if runs.is_run(source) else None)
    baseline = evaluate.teacher_target(teacher["path"], args.compare_solver, args.compare_steps,
                                       guidance_scale=teacher["guidance_scale"], batch_size=args.batch_size, device=device,
                                       revision=teacher["revision"], prompts=prompts)
    # draw gives both the same noise and the same balanced labels or cycled prompts from one seed
    (left, _), (right, _) = (target.draw(args.compare_num, args.seed) for target in (baseline, student))
    save_picture(side_by_side(left, right), out / "teacher-vs-student.png")
    print(f"wrote {out / 'teacher-vs-student.png'}: {baseline.name} | {student.name}, seed {args.seed}")


def _flat_eval(config: dict):
    """The eval and data sections of a run's resolved config, as (dotted key, value)."""
    for section in ("eval", "data"):
        for key, value in config.get(section, {}).items():
            yield f"{section}.{key}", value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Distill a diffusers checkpoint into a 1-4 step sampler.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a student from a recipe (use `accelerate launch -m distill.train` for several processes)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=_train)

    p = sub.add_parser("validate", help="check a recipe (keys, types, combinations, files) without training")
    p.add_argument("recipe", nargs="?", help="the recipe (not needed with --keys)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--print", action="store_true", help="print the resolved config")
    p.add_argument("--keys", action="store_true", help="list every recipe key with its default and help, then exit")
    p.set_defaults(func=_validate)

    p = sub.add_parser("export", help="write a run's student as a diffusers pipeline directory")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--checkpoint", default="latest", help="'latest', 'best' (kept by eval.every), a checkpoint's name in the run (step-001400) or a checkpoint directory")
    p.add_argument("--formats", "--format", nargs="+", choices=["pipeline", "lora", "kohya", "lora-extract", "single-file"],
                   default=None,
                   help="what to write (default: all the student has): pipeline (LoRA fused in), lora (diffusers "
                        "LoRA for pipe.load_lora_weights, in lora/), kohya (kohya/ComfyUI LoRA, in kohya/); for a fully "
                        "trained student lora-extract (a rank --rank LoRA of its difference from the teacher, in lora/ "
                        "and kohya/, its images' distance to the student in the card); single-file "
                        "(distill_student.safetensors in the family's original checkpoint layout, for AUTOMATIC1111 / "
                        "ComfyUI; teachers/single_file.py says which families have one, and export names them when one has not)")
    p.add_argument("--rank", type=int, default=None, help="rank of the LoRA that lora-extract writes")
    p.add_argument("--prompts", default=None, help="lora-extract on a text-to-image run: prompts of the distance's images "
                                                    "(a .txt file or an HF dataset; default: the run's training data's)")
    p.set_defaults(func=_export)

    for name, help in (("sample", "draw a grid of samples"), ("eval", "score samples: FD, KID, precision/recall, CMMD, class accuracy, speed")):
        p = sub.add_parser(name, help=f"{help} from a run directory, an export, or a teacher with --solver")
        p.add_argument("target", help="run directory, exported pipeline directory, or teacher (local dir or hub id) with --solver")
        p.add_argument("--checkpoint", default="latest", help="for a run: 'latest', 'best', a checkpoint's name (step-001400) or a checkpoint directory")
        p.add_argument("--steps", type=int, default=None,
                       help="sampling steps (default: the student's; with --solver and eval: 1, 2, 4, 8, 25 and 50)")
        p.add_argument("--solver", choices=["ddim", "dpmsolver++", "all"], default=None,
                       help="sample the target as a teacher with this stock diffusers solver (all: both)")
        p.add_argument("--guidance-scale", type=float, default=None,
                       help="guidance for --solver: the CFG scale (1: none), or the embedded scale of a guidance-distilled "
                            "teacher (FLUX.1-dev); default: the teacher's own (no CFG; FLUX.1-dev: its default 3.5)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--batch-size", type=int, default=config_lib.EvalConfig().batch_size, help="generation batch")
        p.add_argument("--prompts", default=None,
                       help="text-to-image targets: a .txt file (one prompt per line) or an HF dataset with a `text` column "
                            "(default for a run: its training data's prompts)")
        if name == "sample":
            p.add_argument("--out", default="samples.png")
            p.add_argument("--num", type=int, default=64)
            p.set_defaults(func=_sample)
        else:
            p.add_argument("--out", default=None, help="output directory (default: RUN/eval, else eval/<target name>)")
            p.add_argument("--num", type=int, default=None, help="samples per target (default: eval.num_samples)")
            p.add_argument("--draws", type=int, default=1, help="score this many disjoint draws of --num samples each (one "
                                                                 "seed) and report their mean, with FD's spread (FD sd)")
            p.add_argument("--features", default=None, help="feature spaces, e.g. [classifier,dinov2] (default: eval.features)")
            p.add_argument("--classifier", default=None, help="scoring classifier (default: eval.classifier)")
            p.add_argument("--dinov2", default=None, help="DINOv2 checkpoint for the dinov2 features (default: eval.dinov2)")
            p.add_argument("--clip", default=None, help="CLIP model for the CLIP score against --prompts and for --cmmd "
                                                        "(default: eval.clip)")
            p.add_argument("--cmmd", action="store_true", help="also score CMMD, the MMD of CLIP image embeddings against "
                                                               "the reference images (needs --clip or eval.clip)")
            p.add_argument("--reference", default=None,
                           help="image-caption dataset whose images FD / precision / recall compare with (default for a run: its data)")
            p.add_argument("--cache-dir", default=None, help="reference-feature cache (default: eval.cache_dir)")
            p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
            p.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
            p.add_argument("--compare-num", type=int, default=16,
                           help="a run or export: images in teacher-vs-student.png, the teacher | the student from the same "
                                "seeds and labels or prompts (0: no such grid)")
            p.add_argument("--compare-solver", choices=["ddim", "dpmsolver++"], default="dpmsolver++",
                           help="the teacher's solver in teacher-vs-student.png")
            p.add_argument("--compare-steps", type=int, default=25, help="the teacher's steps in teacher-vs-student.png")
            p.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except user_errors() as err:
        sys.exit(f"distill: {err}")


if __name__ == "__main__":
    main()
