"""The Accelerate training loop: setup -> train -> save / resume -> final scores.

One *student step* is ``method.fake_score_updates`` critic updates followed by one
generator update (DMD2's two time-scale rule); each update accumulates
``train.gradient_accumulation_steps`` micro-batches. Micro-batch ``i`` of the run reads
data batch ``i`` and draws all its randomness from ``step_generator(seed, i, rank)``, so a
resumed run repeats the uninterrupted one exactly.

Run directory::

    config.yaml           the resolved recipe
    losses.jsonl          one line of losses per logged step (main process)
    logs/                 TensorBoard: losses, learning rates, sample grids
    samples/step-N.png    sample grids of the EMA student (fixed noise and labels)
    checkpoints/step-N/   accelerate state (models, optimizers, EMA, RNG, step) + student/
    checkpoints/best/     student/ with the best FD seen by the evaluations during training,
                          and scores.json (its step and scores)
    scores.jsonl          one line of scores per evaluation during training (eval.every)
    metrics.json          final scores
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from distill import config as config_lib
from distill.config import Config
from distill.data import EpochSampler, cached_dataset, collate, image_reference_set, make_dataset, step_generator
from distill.discriminators import Discriminator, Heads
from distill.errors import NonFiniteError
from distill.evaluate import Scorer, draw
from distill.methods import ADD, DMD2, Critic
from distill.methods.common import to_device
from distill.students import (FewStepSampler, enable_gradient_checkpointing, eval_copy, lora_config, make_roles,
                               save_student, set_trainable, trainable_parameters)
from distill.teachers import COND_PREFIX, load_teacher

CHECKPOINT_PREFIX = "step-"
BEST = "best"


class TrainState:
    """The loop's own resumable state; registered with Accelerate's checkpointing."""

    def __init__(self):
        self.step = 0
        self.elapsed_seconds = 0.0
        self.skipped_updates = 0  # updates skipped for a non-finite loss or gradient, over the run
        self.nonfinite_streak = 0  # student steps in a row with a skipped update

    def state_dict(self) -> dict:
        return {"step": self.step, "elapsed_seconds": self.elapsed_seconds, "skipped_updates": self.skipped_updates,
                "nonfinite_streak": self.nonfinite_streak}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.elapsed_seconds = float(state["elapsed_seconds"])
        # checkpoints written before the non-finite guard have neither count
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))


def find_checkpoint(output_dir: str | Path, which: str = "latest") -> Path:
    """The newest complete checkpoint of a run (``which='latest'``), the best one kept by
    the evaluations during training (``'best'``), or the directory given."""
    if which == BEST:
        best = Path(output_dir) / "checkpoints" / BEST
        if not (best / "student").is_dir():
            raise FileNotFoundError(f"no best checkpoint at {best.resolve()} (it is kept when eval.every > 0)")
        return best
    if which != "latest":
        path = Path(which)
        if not (path / "student").is_dir():
            raise FileNotFoundError(f"{path.resolve()} is not a distill checkpoint (no student/ inside)")
        return path
    root = Path(output_dir) / "checkpoints"
    found = sorted(
        (p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()),
        key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]),
    )
    if not found:
        raise FileNotFoundError(f"no checkpoint in {root.resolve()} (looked for {CHECKPOINT_PREFIX}<step>/ directories)")
    return found[-1]


def image_grid(images: torch.Tensor, columns: int) -> torch.Tensor:
    """[N, C, H, W] in [0, 1] -> one [C, rows*H, columns*W] grid (1-pixel gaps)."""
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + 1) - 1, columns * (w + 1) - 1)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, r * (h + 1) : r * (h + 1) + h, col * (w + 1) : col * (w + 1) + w] = image
    return grid


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None, scale: int = 4) -> None:
    from PIL import Image

    columns = columns or math.ceil(math.sqrt(len(images)))
    grid = image_grid(images.float().cpu(), columns)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)


class DistillTrainer:
    """``setup()``, then ``train()``; each ``_setup_x`` builds one thing."""

    def __init__(self, config: Config):
        self.config = config
        self.output_dir = Path(config.output_dir)

    # ---------------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg = self.config
        self.accelerator = Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        set_seed(cfg.seed)
        self.device = self.accelerator.device
        self.teacher = self._setup_teacher()
        self.sampler = FewStepSampler(cfg.student.timesteps, self.teacher.schedule)
        self.method = self._setup_method()
        student, fake_score = self._setup_roles()
        critic = self._setup_critic(fake_score)
        optimizer_s, schedule_s = self._setup_optimizer(trainable_parameters(student), cfg.optim.student)
        optimizer_c, schedule_c = self._setup_optimizer(trainable_parameters(critic), cfg.optim.critic)
        (self.student, self.critic, self.optimizer_s, self.optimizer_c, self.lr_s, self.lr_c) = self.accelerator.prepare(
            student, critic, optimizer_s, optimizer_c, schedule_s, schedule_c
        )
        self.ema = self._setup_ema()
        self.state = TrainState()
        self.accelerator.register_for_checkpointing(self.state)
        self.dataset, self.data_order = self._setup_data()
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config_lib.dump(cfg, self.output_dir / "config.yaml")
        self.accelerator.init_trackers("distill", config=_flat(config_lib.to_dict(cfg)))

    def _setup_teacher(self):
        t = self.config.teacher
        teacher = load_teacher(t.path, t.revision, dtype=getattr(torch, t.dtype), image_size=self.config.data.resolution)
        return teacher.to(self.device)

    def _setup_method(self) -> DMD2 | ADD:
        m = self.config.method
        common = dict(teacher=self.teacher, sampler=self.sampler, guidance_scale=self.config.teacher.guidance_scale,
                      gan_weight=m.gan_weight, gan_loss=m.gan_loss, t_min=m.t_min, t_max=m.t_max,
                      r1_kind=m.r1.kind, r1_weight=m.r1.weight, r1_sigma=m.r1.sigma)
        if m.name == "add":
            return ADD(**common, distill_weight=m.distill_weight, distill_weighting=m.distill_weighting,
                       augment=m.discriminator.augment)
        return DMD2(**common, dmd_weight=m.dmd_weight, critic_gan_weight=m.critic_gan_weight,
                    backward_simulation=self.config.student.backward_simulation,
                    discriminator_backbone=m.discriminator.backbone)

    def _setup_roles(self):
        """(student, fake score or None): full copies, or LoRA roles on the teacher's own denoiser."""
        cfg = self.config
        student_lora, fake_score_lora = (lora_config(rank=c.rank, alpha=c.alpha, target_modules=c.target_modules)
                                         for c in (cfg.student.lora, cfg.method.fake_score_lora))
        _, student, fake_score = make_roles(self.teacher.denoiser, student_lora=student_lora, fake_score_lora=fake_score_lora,
                                            with_fake_score=cfg.method.name == "dmd2")
        if cfg.train.gradient_checkpointing:
            for network in (student, fake_score):
                if network is not None:
                    enable_gradient_checkpointing(network)
        return student, fake_score

    def _setup_critic(self, fake_score) -> Critic | Discriminator:
        method, d = self.config.method, self.config.method.discriminator
        discriminator = None
        if d.backbone != "fake_score":
            discriminator = Discriminator(backbone=d.backbone, teacher=self.teacher, dinov2=d.dinov2, layers=d.layers,
                                          width=d.head_width, device=self.device)
        if method.name == "add":
            return discriminator
        head = None
        if self.method.uses_gan and discriminator is None:
            head = Heads("maps", [self.teacher.bottleneck_channels()], width=d.head_width, num_classes=self.teacher.num_classes,
                         cond_dim=self.teacher.head_condition_dim)
        return Critic(fake_score, self.teacher, head, discriminator if self.method.uses_gan else None)

    def _setup_optimizer(self, parameters, optim: config_lib.OptimizerConfig):
        optimizer = torch.optim.AdamW(parameters, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
        warmup = optim.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        return optimizer, schedule

    def _setup_ema(self) -> EMAModel | None:
        if self.config.train.ema_decay == 0:
            return None
        student = self.accelerator.unwrap_model(self.student)
        ema = EMAModel(trainable_parameters(student), decay=self.config.train.ema_decay)
        ema.to(self.device)
        self.accelerator.register_for_checkpointing(ema)
        return ema

    def _setup_data(self):
        d = self.config.data
        self.raw_dataset = dataset = dataset_from_config(d, resolution=self.teacher.image_size[0],
                                                         num_classes=self.teacher.num_classes)
        if d.cache_dir is not None:
            with self.accelerator.main_process_first():  # the main process encodes; the others find it complete
                dataset = cached_dataset(dataset, self._encode_for_cache, cache_dir=d.cache_dir,
                                         key=teacher_identity(self.config.teacher, self.teacher.image_size), batch_size=d.batch_size)
        order = EpochSampler(
            len(dataset),
            d.batch_size,
            seed=self.config.seed,
            rank=self.accelerator.process_index,
            world_size=self.accelerator.num_processes,
        )
        return dataset, order

    @torch.no_grad()
    def _encode_for_cache(self, batch: dict) -> dict[str, torch.Tensor]:
        """What the cache stores per item: the conditioning (``cond.<key>``) and, for images,
        their latents (``latent``): what the teacher would otherwise encode every step."""
        batch = to_device(batch, self.device)
        encoded = {f"{COND_PREFIX}{k}": v for k, v in self.teacher.condition(batch).items()}
        if "image" in batch:
            encoded["latent"] = self.teacher.encode_images(batch["image"])
        return encoded

    # ---------------------------------------------------------------------- loop
    @property
    def micro_batches_per_step(self) -> int:
        return (self.config.method.fake_score_updates + 1) * self.config.train.gradient_accumulation_steps

    def _update(self, model, optimizer, lr_schedule, loss_fn, first_micro_batch: int) -> tuple[dict, bool]:
        """One optimizer update of ``model`` over ``gradient_accumulation_steps`` micro-batches:
        (logs, whether it was applied). An update whose loss or gradient norm is not finite on
        any process is skipped on every process: gradients dropped, no weight, optimizer or
        learning-rate state moves."""
        accumulation = self.config.train.gradient_accumulation_steps
        logs: dict[str, torch.Tensor] = {}
        finite = torch.ones((), device=self.device)
        for micro in range(accumulation):
            index = first_micro_batch + micro
            batch = collate(self.dataset, self.data_order.batch(index))
            generator = step_generator(self.config.seed, index, self.accelerator.process_index)
            sync = nullcontext() if micro == accumulation - 1 else self.accelerator.no_sync(model)
            with sync, self.accelerator.autocast():
                loss, micro_logs = loss_fn(batch, generator)
            finite = finite * torch.isfinite(loss.detach()).all()
            self.accelerator.backward(loss / accumulation)
            for key, value in micro_logs.items():
                logs[key] = logs.get(key, 0.0) + value.float() / accumulation
        parameters = [p for p in trainable_parameters(model) if p.grad is not None]
        if self.config.train.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(parameters, self.config.train.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        logs["grad_norm"] = torch.as_tensor(norm).detach().float()
        finite = finite * torch.isfinite(logs["grad_norm"].to(self.device))
        applied = bool(self.accelerator.reduce(finite.float(), reduction="sum") == self.accelerator.num_processes)
        if applied:
            optimizer.step()
            lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return logs, applied

    def _train_step(self, step: int) -> dict:
        student, critic = self.accelerator.unwrap_model(self.student), self.accelerator.unwrap_model(self.critic)
        base = step * self.micro_batches_per_step
        accumulation = self.config.train.gradient_accumulation_steps
        logs, skipped = {}, 0
        set_trainable(critic, True)
        for update in range(self.config.method.fake_score_updates):
            logs, applied = self._update(
                self.critic,
                self.optimizer_c,
                self.lr_c,
                lambda batch, g: self.method.critic_loss(student, self.critic, batch, g, self.device),
                base + update * accumulation,
            )
            skipped += not applied
        logs = {f"critic/{k}": v for k, v in logs.items()}
        set_trainable(critic, False)
        generator_logs, applied = self._update(
            self.student,
            self.optimizer_s,
            self.lr_s,
            lambda batch, g: self.method.generator_loss(self.student, critic, batch, g, self.device),
            base + self.config.method.fake_score_updates * accumulation,
        )
        skipped += not applied
        logs.update({f"generator/{k}": v for k, v in generator_logs.items()})
        if self.ema is not None and applied:
            self.ema.step(trainable_parameters(student))
        self._count_nonfinite(step, skipped, logs)
        return logs

    def _count_nonfinite(self, step: int, skipped: int, logs: dict) -> None:
        """Count the step's skipped updates; stop after ``train.max_nonfinite_steps`` steps in a
        row with one, naming the step and its losses (the weights never took the bad update,
        so the last checkpoint is as good as it was)."""
        state = self.state
        state.skipped_updates += skipped
        state.nonfinite_streak = state.nonfinite_streak + 1 if skipped else 0
        logs["train/skipped_updates"] = torch.tensor(float(state.skipped_updates))
        if skipped:
            losses = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(logs.items()) if k.endswith("_loss") or "grad_norm" in k)
            self.accelerator.print(f"step {step + 1}: {skipped} update(s) skipped, a loss or gradient was not finite ({losses})")
        if state.nonfinite_streak >= self.config.train.max_nonfinite_steps:
            raise NonFiniteError(
                f"stopped at step {step + 1}: {state.nonfinite_streak} student steps in a row had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={self.config.train.max_nonfinite_steps}); last losses: {losses}. No bad update "
                f"reached the weights; the last checkpoint in {self.output_dir / 'checkpoints'} loads and resumes. Lower the "
                "learning rates or train.max_grad_norm, or look for NaNs in the data")

    def train(self) -> dict | None:
        cfg = self.config
        if cfg.resume is not None:
            self._resume(cfg.resume)
        accelerator = self.accelerator
        progress = tqdm(
            total=cfg.train.max_steps,
            initial=self.state.step,
            desc="distill",
            disable=not accelerator.is_local_main_process,
            dynamic_ncols=True,
        )
        started = time.time() - self.state.elapsed_seconds
        stopped_early = False
        while self.state.step < cfg.train.max_steps:
            logs = self._train_step(self.state.step)
            self.state.step += 1
            self.state.elapsed_seconds = time.time() - started
            step = self.state.step
            progress.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                self._log(logs, step, progress)
            if cfg.train.max_minutes is not None and accelerator.is_main_process and self.state.elapsed_seconds > cfg.train.max_minutes * 60:
                accelerator.set_trigger()
            stopped_early = accelerator.check_trigger() and step < cfg.train.max_steps
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps or stopped_early:
                self.save_checkpoint()
            if cfg.train.sample_every and (step % cfg.train.sample_every == 0 or step == cfg.train.max_steps or stopped_early):
                self.write_samples(step)
            if cfg.eval.every and step % cfg.eval.every == 0:
                self._log_scores(step)
            if stopped_early:
                accelerator.print(f"train.max_minutes={cfg.train.max_minutes} reached at step {step}; stopping")
                break
        progress.close()
        metrics = self.final_scores()
        accelerator.end_training()
        return metrics

    def _log(self, logs: dict, step: int, progress) -> None:
        keys = sorted(logs)
        values = torch.stack([torch.as_tensor(logs[k], device=self.device).float().reshape(()) for k in keys])
        values = self.accelerator.reduce(values, reduction="mean")
        scalars = {k: float(v) for k, v in zip(keys, values)}
        scalars["lr/student"] = self.lr_s.get_last_lr()[0]
        scalars["lr/critic"] = self.lr_c.get_last_lr()[0]
        self.accelerator.log(scalars, step=step)
        if self.accelerator.is_main_process:
            with open(self.output_dir / "losses.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
            progress.set_postfix(
                generator=f"{scalars.get('generator/generator_loss', float('nan')):.4f}",
                critic=f"{scalars.get('critic/critic_loss', float('nan')):.4f}",
            )

    # ---------------------------------------------------------------------- checkpoints
    def eval_student(self) -> torch.nn.Module:
        """A copy of the student holding the EMA weights (or the raw weights without EMA)."""
        student = eval_copy(self.accelerator.unwrap_model(self.student))
        if self.ema is not None:
            self.ema.copy_to(trainable_parameters(student))
        return student

    def save_checkpoint(self) -> Path:
        """Accelerate state plus ``student/`` (diffusers format, EMA weights), written to a
        temporary directory and renamed, so the newest complete checkpoint always loads."""
        accelerator = self.accelerator
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.state.step:06d}"
        partial = root / f".partial-{CHECKPOINT_PREFIX}{self.state.step:06d}"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        if accelerator.is_main_process:
            save_student(self.eval_student(), partial / "student")
            (partial / "distill.json").write_text(
                json.dumps({"step": self.state.step, "timesteps": self.sampler.timesteps, "teacher": self.config.teacher.path})
            )
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            kept = sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
            for old in kept[: -self.config.train.keep_checkpoints]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def _resume(self, which: str) -> None:
        checkpoint = find_checkpoint(self.output_dir, which)
        self.accelerator.load_state(str(checkpoint))
        self.accelerator.print(f"resumed from {checkpoint} at step {self.state.step}")
        for log in ("losses.jsonl", "scores.jsonl"):  # drop what the lost steps logged
            path = self.output_dir / log
            if self.accelerator.is_main_process and path.is_file():
                rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.state.step]
                path.write_text("".join(row + "\n" for row in rows))
        best = self.output_dir / "checkpoints" / BEST
        if self.accelerator.is_main_process and (best / "scores.json").is_file():
            if json.loads((best / "scores.json").read_text())["step"] > self.state.step:
                shutil.rmtree(best)  # chosen among lost steps; the resumed run chooses again

    # ---------------------------------------------------------------------- samples and scores
    def generate(self, student: torch.nn.Module, num: int, seed: int,
                 clamp: bool = True) -> tuple[torch.Tensor, "torch.Tensor | list[str] | None"]:
        """``num`` samples (images in [0, 1]) with balanced class labels or the data's prompts,
        from a fixed seed."""
        return generate(self.teacher, student, self.sampler, num, seed, self.config.eval.batch_size, self.device,
                        getattr(self.raw_dataset, "prompts", None), clamp)

    def write_samples(self, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        images, _ = self.generate(self.eval_student(), self.config.train.num_grid_samples, seed=self.config.seed)
        path = self.output_dir / "samples" / f"step-{step:06d}.png"
        save_grid(images, path)
        tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
        columns = math.ceil(math.sqrt(len(images)))
        tracker.add_image("samples", image_grid(images.float().cpu(), columns), global_step=step)

    def scores(self, num_samples: int) -> tuple[dict, torch.nn.Module]:
        """Scores of the EMA student on ``num_samples`` samples (fixed seed), and that student."""
        if not hasattr(self, "_scorer"):
            self._scorer = scorer_from_config(self.config.eval, self.config.data.dataset, self.device,
                                              reference=eval_reference(self.raw_dataset, self.config.eval))
        student = self.eval_student()
        images, labels = self.generate(student, num_samples, seed=self.config.seed + 1, clamp=False)
        return self._scorer(images, labels), student

    @property
    def best_metric(self) -> str:
        return f"fd_{self.config.eval.features[0]}"

    def _log_scores(self, step: int) -> None:
        """Evaluate during training: log the scores and keep the best student so far."""
        if not self.accelerator.is_main_process:
            return
        metrics, student = self.scores(self.config.eval.every_num_samples)
        self.accelerator.log({f"eval/{k}": v for k, v in metrics.items() if k != "num_samples"}, step=step)
        with open(self.output_dir / "scores.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "minutes": round(self.state.elapsed_seconds / 60, 2), **metrics}) + "\n")
        best = self.output_dir / "checkpoints" / BEST
        previous = json.loads((best / "scores.json").read_text()) if (best / "scores.json").is_file() else None
        if previous is not None and previous[self.best_metric] <= metrics[self.best_metric]:
            return
        partial = best.with_name(f".partial-{BEST}")
        shutil.rmtree(partial, ignore_errors=True)
        save_student(student, partial / "student")
        (partial / "scores.json").write_text(json.dumps({"step": step, **metrics}, indent=2) + "\n")
        shutil.rmtree(best, ignore_errors=True)
        partial.rename(best)

    def final_scores(self) -> dict | None:
        if not self.accelerator.is_main_process or not (self.config.eval.features or self.config.eval.clip):
            return None
        metrics, _ = self.scores(self.config.eval.num_samples)
        metrics.update(step=self.state.step, steps=len(self.sampler), timesteps=self.sampler.timesteps,
                       train_minutes=round(self.state.elapsed_seconds / 60, 2))
        (self.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        self.accelerator.print(f"scores of the {len(self.sampler)}-step student: {json.dumps(metrics)}")
        return metrics


def scorer_from_config(e: config_lib.EvalConfig, dataset: str, device, reference=None) -> Scorer:
    """The ``Scorer`` a recipe's ``eval`` section describes, for its dataset (``reference``:
    see ``eval_reference``)."""
    return Scorer(feature_spaces=e.features, dataset=dataset, classifier=e.classifier, dinov2=e.dinov2,
                  cache_dir=e.cache_dir, nearest_k=e.nearest_k, kid_subsets=e.kid_subsets,
                  kid_subset_size=e.kid_subset_size, batch_size=e.batch_size, device=device, clip=e.clip,
                  reference=reference)


def dataset_from_config(d: config_lib.DataConfig, *, resolution: int, num_classes: int | None = None):
    """The dataset a recipe's ``data`` section names (images at ``resolution``)."""
    return make_dataset(dataset=d.dataset, path=d.path, split=d.split, prompt_column=d.prompt_column,
                        image_column=d.image_column, resolution=resolution, num_classes=num_classes)


def eval_reference(dataset, e: config_lib.EvalConfig) -> tuple[str, torch.Tensor] | None:
    """The real images samples are scored against when the data is an image-caption set (a
    fixed subset of ``eval.num_samples``); None for the built-in digits (their own reference
    set) and for prompts (no images)."""
    if not e.features or not hasattr(dataset, "table"):
        return None
    key, images, _ = image_reference_set(dataset, num=min(e.num_samples, len(dataset)))
    return key, images


def teacher_identity(t: config_lib.TeacherConfig, image_size) -> str:
    """Names the teacher's encoders for the latent / embedding cache: path, revision, dtype,
    image size and, for a local directory, the size and time of every weight file."""
    parts = [t.path, str(t.revision), t.dtype, f"{image_size[0]}x{image_size[1]}"]
    local = Path(t.path).expanduser()
    if local.is_dir():
        for weights in sorted(local.rglob("*.safetensors")):
            stat = weights.stat()
            parts.append(f"{weights.relative_to(local)}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def generate(teacher, student, sampler: FewStepSampler, num: int, seed: int, batch_size: int, device,
             prompts: list[str] | None = None, clamp: bool = True) -> tuple[torch.Tensor, "torch.Tensor | list[str] | None"]:
    """Images in [0, 1] [num, C, H, W] from the student's few-step sampler, and their class
    labels (balanced) or prompts, drawn with one CPU generator seeded with ``seed``."""

    def sample_x0(noise, cond, generator):
        return sampler.sample(lambda x_t, t: teacher.x0(student, x_t, t, cond), noise, generator)

    return draw(teacher, sample_x0, num, seed, batch_size, device, prompts, clamp)


def _flat(tree: dict, prefix: str = "") -> dict:
    """Flatten nested config dicts for TensorBoard's hparams (lists become strings)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value) if isinstance(value, (list, type(None))) else value
    return flat
