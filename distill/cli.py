"""``distill train | export | sample | validate``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distill import config as config_lib


def _validate(args) -> None:
    if args.keys:
        for key, help, default in config_lib.describe():
            print(f"{key} = {default!r}\n    {help}")
        return
    config = config_lib.load(args.recipe, args.overrides)
    if args.print:
        import yaml

        print(yaml.safe_dump(config_lib.to_dict(config), sort_keys=False), end="")
    print(f"{args.recipe}: ok")


def _train(args) -> None:
    from distill.train import main

    main([args.recipe, *args.overrides])


def _export(args) -> None:
    from distill.export import export

    out = export(args.run_dir, args.out_dir, checkpoint=args.checkpoint)
    print(f"exported {args.run_dir} -> {out}")


def _sample(args) -> None:
    """A grid from a run directory (its newest checkpoint) or from an export."""
    import torch

    from distill.trainer import generate, save_grid

    source = Path(args.source)
    if (source / "config.yaml").is_file():
        from distill.export import load_run
        from distill.students import FewStepSampler
        from distill.teachers import load_teacher

        config, checkpoint = load_run(source)
        teacher = load_teacher(config["teacher"]["path"], config["teacher"].get("revision"))
        student = type(teacher.denoiser).from_pretrained(checkpoint / "student", use_safetensors=True).eval()
        sampler = FewStepSampler(config["student"]["timesteps"], teacher.schedule)
        steps = args.steps or len(sampler)
        if steps != len(sampler):
            sampler = FewStepSampler(sampler.timesteps[:steps], teacher.schedule)
        images, _ = generate(teacher, student, sampler, args.num, args.seed, args.num, "cpu")
    elif (source / "model_index.json").is_file():
        from diffusers import DiffusionPipeline

        from distill.evaluate import balanced_labels, sample_teacher
        from distill.teachers import teacher_from_pipeline

        pipe = DiffusionPipeline.from_pretrained(source)
        exported = teacher_from_pipeline(pipe)  # the student, under its own few-step scheduler
        steps = args.steps or _default_steps(source)
        generator = torch.Generator().manual_seed(args.seed)
        labels = balanced_labels(args.num, exported.num_classes)
        cond = exported.condition({"class_label": labels}) if labels is not None else {}
        noise = torch.randn((args.num, *exported.sample_shape), generator=generator)
        x0 = sample_teacher(exported, type(pipe.scheduler), steps, noise, cond, generator=generator)
        images = exported.decode(x0)
    else:
        raise SystemExit(f"distill sample: {source.resolve()} is neither a run directory (config.yaml) nor an export (model_index.json)")
    save_grid(images, args.out)
    print(f"wrote {args.out} ({args.num} samples, {steps} steps)")


def _default_steps(export_dir: Path) -> int:
    import yaml

    recipe = export_dir / "distill_recipe.yaml"
    return len(yaml.safe_load(recipe.read_text())["student"]["timesteps"]) if recipe.is_file() else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Distill a diffusers checkpoint into a 1-4 step sampler.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a student from a recipe (use `accelerate launch -m distill.train` for several processes)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=_train)

    p = sub.add_parser("validate", help="check a recipe (keys, types, combinations, files) without training")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--print", action="store_true", help="print the resolved config")
    p.add_argument("--keys", action="store_true", help="list every recipe key with its default and help, then exit")
    p.set_defaults(func=_validate)

    p = sub.add_parser("export", help="write a run's student as a diffusers pipeline directory")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--checkpoint", default="latest", help="'latest' or a checkpoint directory")
    p.set_defaults(func=_export)

    p = sub.add_parser("sample", help="draw a sample grid from a run directory or an export")
    p.add_argument("source", help="run directory or exported pipeline directory")
    p.add_argument("--out", default="samples.png")
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the student's)")
    p.set_defaults(func=_sample)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (config_lib.ConfigError, FileNotFoundError) as err:
        sys.exit(f"distill {args.command}: {err}")


if __name__ == "__main__":
    main()
