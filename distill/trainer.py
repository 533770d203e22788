"""The Accelerate training loop: setup -> train -> save / resume -> final scores (-> with
``eval.rescore_top``, the shortlist rescored on fresh draws and the lowest made best).

One *student step* is ``method.critic_updates`` critic updates (none for a method without
a critic) followed by one generator update (DMD2's two time-scale rule); each update
accumulates ``train.gradient_accumulation_steps`` micro-batches. Micro-batch ``i`` of the
run reads data batch ``i`` and draws all its randomness from ``step_generator(seed, i,
rank)``, so a resumed run repeats the uninterrupted one exactly. The run directory's layout
is ``distill.runs``'s; the method (``distill.methods``) is whatever ``method.name`` names.

Each micro-batch is read (``StepBatches``: ahead, by ``data.num_workers`` DataLoader
workers), moved to the device and encoded there (the teacher's text encoders and VAE, once
per batch, batched) before the method's loss sees it, as a cached batch would be. Every logged
step carries its time per phase (``time/data_s``, ``time/critic_s``, ``time/generator_s``,
``time/optimizer_s``, ``time/ema_s``, ``time/log_s``; ``distill.timing``) and
``time/samples_per_s``. DDP, FSDP2 and DeepSpeed come from Accelerate's launch config
(``distill.parallel``): the trained networks are prepared one by one, the frozen teacher is
replicated, and a sharded student is gathered for checkpoints, samples and scores.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from distill import config as config_lib
from distill import runs, trackers
from distill.atomic import atomic_directory, partial_directory
from distill.plots import plot_against_step
from distill.config import Config
from distill import parallel
from distill.data import EpochSampler, StepBatches, cached_dataset, step_generator
from distill.factories import dataset_from_config, eval_reference, scorer_from_config, teacher_identity
from distill.grids import image_grid, save_grid
from distill.methods.common import to_device
from distill.offload import Offload
from distill.sampling import draw_student
from distill.students import (FewStepSampler, LoraRole, enable_gradient_checkpointing, eval_copy, lora_config,
                               lora_state_dict, make_roles, make_student, save_lora_files, save_student, set_trainable,
                               trainable_parameters)
from distill.teachers import COND_PREFIX, load_teacher
from distill.timing import PhaseTimer
from distill.train_state import TrainState


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
            log_with=cfg.train.log_with or None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        set_seed(cfg.seed)
        self.device = self.accelerator.device
        self.timer = PhaseTimer(self.device)
        self.teacher = self._setup_teacher()
        config_lib.fill_teacher_defaults(cfg, self.teacher)  # e.g. LoRA targets left null: the adapter's
        self.sampler = FewStepSampler(cfg.student.timesteps, self.teacher.schedule, self.teacher.step_noise)
        self.method = cfg.method.build(teacher=self.teacher, sampler=self.sampler, guidance_scale=cfg.teacher.guidance_scale,
                                       backward_simulation=cfg.student.backward_simulation)
        self.needs_images = cfg.method.needs_real_images(num_steps=len(cfg.student.timesteps),
                                                         backward_simulation=cfg.student.backward_simulation)
        student, fake_score = self._setup_roles()
        parallel.check_roles(self.accelerator, lora_roles=any(isinstance(r, LoraRole) for r in (student, fake_score)),
                             ema=cfg.train.ema_decay > 0)
        critic = self.method.build_critic(fake_score=fake_score, device=self.device)
        # after the roles: full copies are made from the bare teacher, without hooks or compiled calls
        self.offload = Offload(self.teacher, cfg.teacher.offload, self.device)
        if cfg.train.compile:
            for network in {id(n): n for n in (self.teacher.denoiser, student, fake_score)
                            if n is not None and not isinstance(n, LoraRole)}.values():
                network.compile()
        self.eval_role = None  # a LoRA student's frozen sibling on a sharded shared base (samples, EMA)
        roles = [r for r in (student, fake_score) if isinstance(r, LoraRole)]
        self.base_sharded = parallel.shards_shared_base(self.accelerator, roles)
        self.student_class = type(student)  # a full student's, before Accelerate may swap it for its FSDP subclass
        if self.base_sharded:  # before the optimizers: they hold the shards
            if isinstance(student, LoraRole):  # injected now, to be sharded with the base
                self.eval_role = eval_copy(student)
                roles.append(self.eval_role)
            parallel.shard_shared_base(self.accelerator, self.teacher.denoiser, roles)
        optimizer_s, schedule_s = self._setup_optimizer(trainable_parameters(student), cfg.optim.student,
                                                          updates=cfg.train.max_steps)
        self.critic = self.optimizer_c = self.lr_c = None  # a method without a critic
        # one prepare call per trained network (FSDP2 shards one model a call, DeepSpeed makes one engine each)
        limits = dict(micro_batch_size=cfg.data.batch_size, max_grad_norm=cfg.train.max_grad_norm)
        self.student, self.optimizer_s, self.lr_s = parallel.prepare_trained(self.accelerator, student, optimizer_s,
                                                                             schedule_s, **limits)
        if critic is not None:
            optimizer_c, schedule_c = self._setup_optimizer(trainable_parameters(critic), cfg.optim.critic,
                                                              updates=cfg.train.max_steps * self.method.critic_updates)
            self.critic, self.optimizer_c, self.lr_c = parallel.prepare_trained(self.accelerator, critic, optimizer_c,
                                                                                schedule_c, **limits)
        self.ema = self._setup_ema()
        self.state = TrainState()
        self.accelerator.register_for_checkpointing(self.state)
        self.dataset, self.data_order = self._setup_data()
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config_lib.dump(cfg, self.output_dir / runs.CONFIG)
        trackers.start(self.accelerator, cfg.train.log_with, config_lib.to_flat_dict(cfg), self.output_dir)

    def _setup_teacher(self):
        t = self.config.teacher
        teacher = load_teacher(t.path, t.revision, dtype=getattr(torch, t.dtype), image_size=self.config.data.resolution)
        return teacher.to(self.device)

    def _setup_roles(self):
        """(student, fake score or None): full copies, or LoRA roles on the teacher's own denoiser."""
        cfg, method = self.config, self.method
        lora = cfg.student.lora
        student_lora = lora_config(rank=lora.rank, alpha=lora.alpha, target_modules=lora.target_modules)
        _, student, fake_score = make_roles(self.teacher.denoiser, student_lora=student_lora,
                                            fake_score_lora=method.fake_score_lora, with_fake_score=method.with_fake_score)
        if cfg.train.gradient_checkpointing:
            for network in (student, fake_score):
                if network is not None:
                    enable_gradient_checkpointing(network)
        return student, fake_score

    def _setup_optimizer(self, parameters, optim: config_lib.OptimizerConfig, updates: int):
        """AdamW over ``parameters`` and its learning-rate schedule over ``updates`` optimizer steps."""
        hyper = dict(lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
        if optim.name == "adamw8bit":
            from bitsandbytes.optim import AdamW8bit  # the config check made sure it is installed

            optimizer = AdamW8bit(parameters, **hyper)
        else:  # fused: one kernel over all tensors; on a CPU 4-5x faster than the default (docs/scale.md)
            optimizer = torch.optim.AdamW(parameters, fused=True, **hyper)
        # Accelerate's wrapper steps a schedule once per process each update (DeepSpeed's engine once): the
        # factor reads the update's index, so warm-up and decay last the same steps on any number of processes
        per_update = 1 if parallel.uses_deepspeed(self.accelerator) else self.accelerator.num_processes
        factor = lr_factor(optim, updates)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda count: factor(count // per_update))
        return optimizer, schedule

    def _setup_ema(self) -> parallel.EMA | None:
        if self.config.train.ema_decay == 0:
            return None
        student = self.accelerator.unwrap_model(self.student)
        decay = self.config.train.ema_decay
        # min_decay = decay: the decay from the first step, without diffusers' (1 + t) / (10 + t) warm-up
        ema = parallel.EMA(trainable_parameters(student), decay=decay, min_decay=0.0 if self.config.train.ema_warmup else decay)
        ema.to(self.device)
        self.accelerator.register_for_checkpointing(ema)
        return ema

    def _setup_data(self):
        d = self.config.data
        self.raw_dataset = dataset = dataset_from_config(d, resolution=self.teacher.image_size[0],
                                                         num_classes=self.teacher.num_classes)
        self.skipped_items = runs.report_skipped(self.output_dir, dataset, report=self.accelerator.print,
                                                 main=self.accelerator.is_main_process)
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

    @torch.no_grad()
    def _encode_batch(self, batch: dict) -> dict:
        """A micro-batch on the device with its conditioning (``cond.<key>``) and, where the
        method reads real images, their latents (``latent``), encoded once, batched, as a
        cached batch holds them; what a batch already holds is kept."""
        batch = to_device(batch, self.device)
        with self.accelerator.autocast():
            batch.update({f"{COND_PREFIX}{k}": v for k, v in self.teacher.condition(batch).items()})
            if self.needs_images and "image" in batch and "latent" not in batch:
                batch["latent"] = self.teacher.encode_images(batch["image"])
        self.offload.release()
        return batch

    # ---------------------------------------------------------------------- loop
    @property
    def micro_batches_per_step(self) -> int:
        return (self.method.critic_updates + 1) * self.config.train.gradient_accumulation_steps

    def _update(self, model, optimizer, lr_schedule, loss_fn, first_micro_batch: int) -> tuple[dict, bool]:
        """One optimizer update of ``model`` over ``gradient_accumulation_steps`` micro-batches:
        (logs, whether it was applied). An update whose loss or gradient norm is not finite on
        any process is skipped on every process: gradients dropped, no weight, optimizer or
        learning-rate state moves."""
        accumulation = self.config.train.gradient_accumulation_steps
        deepspeed = parallel.uses_deepspeed(self.accelerator)
        logs: dict[str, torch.Tensor] = {}
        finite = torch.ones((), device=self.device)
        for micro in range(accumulation):
            index = first_micro_batch + micro
            with self.timer.phase("data"):
                batch = self._encode_batch(self.batches.get(index))
            generator = step_generator(self.config.seed, index, self.accelerator.process_index)
            last = micro == accumulation - 1
            sync = nullcontext() if last or deepspeed else self.accelerator.no_sync(model)
            with sync:
                with self.accelerator.autocast():
                    loss, micro_logs = loss_fn(batch, generator)
                finite = finite * torch.isfinite(loss.detach()).all()
                parallel.backward(self.accelerator, model, loss / accumulation, last_micro_batch=last)
            self.offload.release()
            for key, value in micro_logs.items():
                logs[key] = logs.get(key, 0.0) + value.float() / accumulation
        if deepspeed:  # the engine clips, steps, schedules and zeroes; its fp16 loss scaler skips overflows
            with self.timer.phase("optimizer"):
                logs["grad_norm"] = parallel.deepspeed_step(model)
            return logs, True
        parameters = [p for p in trainable_parameters(model) if p.grad is not None]
        if self.config.train.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(parameters, self.config.train.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        logs["grad_norm"] = parallel.full_tensors([torch.as_tensor(norm)])[0].detach().float()  # FSDP2: a DTensor
        finite = finite * torch.isfinite(logs["grad_norm"].to(self.device))
        applied = bool(self.accelerator.reduce(finite.float(), reduction="sum") == self.accelerator.num_processes)
        with self.timer.phase("optimizer"):
            if applied:
                optimizer.step()
                lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
        return logs, applied

    def _train_step(self, step: int) -> dict:
        student = self.accelerator.unwrap_model(self.student)
        critic = self.accelerator.unwrap_model(self.critic) if self.critic is not None else None
        base = step * self.micro_batches_per_step
        accumulation = self.config.train.gradient_accumulation_steps
        updates = self.method.critic_updates
        logs, skipped = {}, 0
        if updates:
            set_trainable(critic, True)
        with self.timer.phase("critic"):
            for update in range(updates):
                logs, applied = self._update(
                    self.critic,
                    self.optimizer_c,
                    self.lr_c,
                    lambda batch, g: self.method.critic_loss(student, self.critic, batch, g, self.device),
                    base + update * accumulation,
                )
                skipped += not applied
        logs = {f"critic/{k}": v for k, v in logs.items()}
        if updates:
            set_trainable(critic, False)
        with self.timer.phase("generator"):
            generator_logs, applied = self._update(
                self.student,
                self.optimizer_s,
                self.lr_s,
                lambda batch, g: self.method.generator_loss(self.student, critic, batch, g, self.device),
                base + updates * accumulation,
            )
        skipped += not applied
        logs.update({f"generator/{k}": v for k, v in generator_logs.items()})
        if self.ema is not None and applied:
            with self.timer.phase("ema"):
                self.ema.step(trainable_parameters(student))
        self.timer.step_done()
        self.state.count_nonfinite(step, skipped, logs, max_steps=self.config.train.max_nonfinite_steps,
                                   checkpoints=self.output_dir / runs.CHECKPOINTS, report=self.accelerator.print)
        return logs

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
        self.batches = StepBatches(self.dataset, self.data_order, start=self.state.step * self.micro_batches_per_step,
                                   num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda")
        self._log_seconds = 0.0  # the last log's own time, counted in the next one's steps
        while self.state.step < cfg.train.max_steps:
            with self.timer.phase("other"):  # what no phase inside the step claims
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
        self.rescore_shortlist()
        accelerator.end_training()
        return metrics

    def _log(self, logs: dict, step: int, progress) -> None:
        """Losses (the mean over processes) and times of the steps since the last log: one host
        synchronisation, here (``PhaseTimer.read``), and one transfer of the values."""
        times = self.timer.read()  # seconds per step, by phase, since the last log
        started = time.perf_counter()
        times["time/log_s"] = self._log_seconds / self.config.train.log_every
        times["time/step_s"] = sum(times.values())
        d = self.config.data
        samples = d.batch_size * self.config.train.gradient_accumulation_steps * self.accelerator.num_processes
        times["time/samples_per_s"] = samples / times["time/step_s"] if times["time/step_s"] > 0 else 0.0
        keys = sorted(logs)
        values = torch.stack([torch.as_tensor(logs[k], device=self.device).float().reshape(()) for k in keys])
        values = self.accelerator.reduce(values, reduction="mean")
        scalars = dict(zip(keys, values.tolist()))
        scalars["lr/student"] = self.lr_s.get_last_lr()[0]
        if self.skipped_items is not None:  # data.on_bad_item: skip
            scalars["data/skipped_items"] = float(self.skipped_items)
        if self.lr_c is not None:
            scalars["lr/critic"] = self.lr_c.get_last_lr()[0]
        self.accelerator.log({**scalars, **times}, step=step)  # times: this process's own (the main one's)
        if self.accelerator.is_main_process:
            runs.append_row(self.output_dir / runs.LOSSES, {"step": step, **scalars})
            runs.append_row(self.output_dir / runs.TIMES, {"step": step, **times})
            progress.set_postfix(
                generator=f"{scalars.get('generator/generator_loss', float('nan')):.4f}",
                critic=f"{scalars.get('critic/critic_loss', float('nan')):.4f}",
            )
        self._log_seconds = time.perf_counter() - started

    # ---------------------------------------------------------------------- checkpoints
    def eval_student(self) -> torch.nn.Module | None:
        """A copy of the student holding the EMA weights (or the raw weights without EMA), on
        the main process. A sharded student (FSDP2, ZeRO-3) is gathered, a collective: then
        every process calls this and the others get None; otherwise only the main process
        needs to, and a call elsewhere returns None too. A LoRA student on a sharded shared
        base is its eval adapter on that base, filled on every process and returned to every
        process: sampling through it is a collective too (``samples_on_every_process``)."""
        main = self.accelerator.is_main_process
        if self.eval_role is not None:
            student = eval_copy(self.accelerator.unwrap_model(self.student))  # the shards, copied on each process
            if self.ema is not None:
                self.ema.copy_to(trainable_parameters(student))
            return student
        if not parallel.is_sharded(self.accelerator):
            if not main:
                return None
            student = eval_copy(self.accelerator.unwrap_model(self.student))
            if self.ema is not None:
                self.ema.copy_to(trainable_parameters(student))
            return student
        state = parallel.full_state_dict(self.accelerator, self.student)
        weights = self.ema.whole() if self.ema is not None else None
        if not main:
            return None
        # the bare network of a full student (LoRA students are above); a sharded base is not copied
        student = (self.student_class.from_config(self.teacher.denoiser.config) if self.base_sharded
                   else make_student(self.teacher.denoiser))
        student.load_state_dict(state)
        if weights is not None:
            with torch.no_grad():
                for p, w in zip(trainable_parameters(student), weights):
                    p.copy_(w)
        return student.to(self.device).eval().requires_grad_(False)

    @property
    def samples_on_every_process(self) -> bool:
        """Whether drawing from the eval student is a collective (its base is sharded)."""
        return self.eval_role is not None

    def _student_writer(self, student: torch.nn.Module | None):
        """``write(directory)`` that saves ``student`` there, for the main process. Every
        process calls this: a LoRA role on a sharded base is gathered here, once."""
        if self.eval_role is None:
            return lambda directory: save_student(student, directory)
        state, config = lora_state_dict(student)
        return lambda directory: save_lora_files(state, config, directory)

    def save_checkpoint(self) -> Path:
        """Accelerate state plus ``student/`` (diffusers format, EMA weights), written by every
        process into one staging directory that the main process renames when all are done."""
        accelerator, main = self.accelerator, self.accelerator.is_main_process
        final = runs.checkpoint_path(self.output_dir, self.state.step)
        with atomic_directory(final) if main else nullcontext(partial_directory(final)) as staging:
            accelerator.wait_for_everyone()
            accelerator.save_state(str(staging))
            student = self.eval_student()  # every process: a sharded student is gathered
            write = self._student_writer(student)
            if main:
                write(staging / runs.STUDENT)
            accelerator.wait_for_everyone()
            if main:  # last, listing the size of every process's files
                runs.write_checkpoint_info(staging, step=self.state.step, timesteps=self.sampler.timesteps,
                                           teacher=self.config.teacher.path)
        if main:
            runs.prune_checkpoints(self.output_dir, self.config.train.keep_checkpoints)
        accelerator.wait_for_everyone()
        return final

    def _resume(self, which: str) -> None:
        report = self.accelerator.print
        checkpoint = runs.find_checkpoint(self.output_dir, which, training_state=True, report=report)
        self.accelerator.load_state(str(checkpoint))
        self.accelerator.print(f"resumed from {checkpoint} at step {self.state.step}")
        if self.accelerator.is_main_process:
            runs.forget_steps_after(self.output_dir, self.state.step, report=report)

    # ---------------------------------------------------------------------- samples and scores
    def _draw(self, student: torch.nn.Module, num: int, seed: int,
              clamp: bool = True) -> tuple[torch.Tensor, "torch.Tensor | list[str] | None"]:
        """``num`` images in [0, 1] with balanced class labels or the data's prompts, from a fixed seed."""
        return draw_student(self.teacher, student, self.sampler, num, seed, self.config.eval.batch_size, self.device,
                            getattr(self.raw_dataset, "prompts", None), clamp)

    def write_samples(self, step: int) -> None:
        student = self.eval_student()  # every process: a sharded student is gathered; sampled on the main one
        if not (self.samples_on_every_process or self.accelerator.is_main_process):
            return
        images, _ = self._draw(student, self.config.train.num_grid_samples, seed=self.config.seed)  # the same on every process
        if not self.accelerator.is_main_process:
            return
        save_grid(images, runs.samples_path(self.output_dir, step))
        trackers.log_images(self.accelerator, "samples", image_grid(images.float().cpu()), step)

    def scores(self, num_samples: int, student: torch.nn.Module | None = None) -> tuple[dict | None, torch.nn.Module]:
        """Scores of the EMA student (``student``: that copy, already made) on ``num_samples``
        samples (fixed seed), and that student; on the main process. Where drawing is a
        collective (``samples_on_every_process``) every process calls this and the others
        get None for the scores."""
        student = self.eval_student() if student is None else student
        images, labels = self._draw(student, num_samples, seed=self.config.seed + 1, clamp=False)
        if not self.accelerator.is_main_process:
            return None, student
        return self.scorer()(images, labels), student

    def scorer(self):
        """The eval section's ``Scorer``, made on first use (main process)."""
        if not hasattr(self, "_scorer"):
            self._scorer = scorer_from_config(self.config.eval, self.config.data.dataset, self.device,
                                              reference=eval_reference(self.raw_dataset, self.config.eval))
        return self._scorer

    @property
    def best_metric(self) -> str:
        return f"fd_{self.config.eval.features[0]}"

    def _log_scores(self, step: int) -> None:
        """Evaluate during training: log the scores and keep the best student so far."""
        student = self.eval_student()  # every process: a sharded student is gathered; scored on the main one
        if not (self.samples_on_every_process or self.accelerator.is_main_process):
            return
        metrics, student = self.scores(self.config.eval.periodic_num_samples(), student)
        write = self._student_writer(student)
        if not self.accelerator.is_main_process:
            return
        self.accelerator.log({f"eval/{k}": v for k, v in metrics.items() if k != "num_samples"}, step=step)
        runs.append_row(self.output_dir / runs.SCORES,
                        {"step": step, "minutes": round(self.state.elapsed_seconds / 60, 2), **metrics})
        space = self.config.eval.features[0]
        plot_against_step(runs.read_rows(self.output_dir / runs.SCORES), [self.best_metric, f"recall_{space}"],
                          self.output_dir / runs.SCORES_PLOT)
        if self.config.eval.rescore_top and runs.keep_if_shortlisted(
                self.output_dir, step=step, scores=metrics, metric=self.best_metric, size=self.config.eval.rescore_top,
                save_student=write):
            # a new best is always shortlisted: its weights are written once, linked into best
            write = runs.link_student(runs.shortlisted_student(self.output_dir, step))
        runs.keep_if_best(self.output_dir, step=step, scores=metrics, metric=self.best_metric,
                          save_student=write)

    def rescore_shortlist(self) -> dict | None:
        """eval.rescore_top: score each shortlisted student on eval.rescore_draws fresh draws
        of eval.num_samples and make the lowest mean ``best_metric`` checkpoints/best (main
        process; the others wait). Returns what best's scores.json records under
        ``"rescored"``, or None (no shortlist, or not the main process)."""
        shortlisting = self.config.eval.rescore_top and self.accelerator.is_main_process
        entries = runs.shortlist(self.output_dir) if shortlisting else []  # by step; none without periodic scores
        rescored = self._rescore(entries) if entries else None
        self.accelerator.wait_for_everyone()
        return rescored

    def _rescore(self, entries: list[runs.Shortlisted]) -> dict:
        from distill.evaluate import run_teacher, student_target

        e, metric, report = self.config.eval, self.best_metric, self.accelerator.print
        # a sharded base holds only this process's shards: the candidates need a whole teacher
        teacher = run_teacher(self.config, self.device) if self.base_sharded else self.teacher
        prompts, scorer = getattr(self.raw_dataset, "prompts", None), self.scorer()
        seeds, table = runs.rescore_seeds(self.config.seed, e.rescore_draws), []
        for entry in entries:
            target = student_target(teacher, self.config, entry.path / runs.STUDENT, batch_size=e.batch_size,
                                    device=self.device, prompts=prompts, adapter=f"shortlist{entry.step}")
            values = [scorer(*target.draw(e.num_samples, seed, clamp=False))[metric] for seed in seeds]
            row = {"step": entry.step, f"periodic_{metric}": entry.scores[metric], metric: sum(values) / len(values),
                   f"{metric}_draws": values}
            table.append(row)
            report(f"rescored shortlist step {entry.step}: {metric} {row[metric]:.4g} over {len(values)} fresh draws "
                   f"(periodic {entry.scores[metric]:.4g})")
        chosen = min(range(len(entries)), key=lambda i: (table[i][metric], entries[i].step))
        rescored = {metric: table[chosen][metric], "draws": len(seeds), "num_samples": e.num_samples, "seeds": seeds,
                    "shortlist": table}
        runs.make_best(self.output_dir, entries[chosen], rescored)
        report(f"checkpoints/best: step {entries[chosen].step} ({metric} {table[chosen][metric]:.4g} on fresh draws), "
               f"of the {len(entries)} lowest periodic scores")
        return rescored

    def final_scores(self) -> dict | None:
        if not (self.config.eval.features or self.config.eval.clip):
            return None
        student = self.eval_student()  # every process: a sharded student is gathered; scored on the main one
        if not (self.samples_on_every_process or self.accelerator.is_main_process):
            return None
        metrics, _ = self.scores(self.config.eval.num_samples, student)
        if not self.accelerator.is_main_process:
            return None
        metrics.update(step=self.state.step, steps=len(self.sampler), timesteps=self.sampler.timesteps,
                       train_minutes=round(self.state.elapsed_seconds / 60, 2))
        runs.write_metrics(self.output_dir, metrics)
        self.accelerator.print(f"scores of the {len(self.sampler)}-step student: {json.dumps(metrics)}")
        return metrics


def lr_factor(optim: config_lib.OptimizerConfig, updates: int):
    """The learning rate of optimizer step ``i`` (0-based) as a fraction of ``optim.lr``: a linear
    warm-up over ``optim.warmup_steps``, then constant or decayed (cosine / linear) to
    ``optim.decay_to`` at step ``updates``."""
    warmup, floor = optim.warmup_steps, optim.decay_to

    def factor(i: int) -> float:
        if warmup and i < warmup:
            return (i + 1) / warmup
        if optim.decay == "constant":
            return 1.0
        done = min(1.0, (i - warmup) / max(1, updates - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * done)) if optim.decay == "cosine" else 1 - done
        return floor + (1 - floor) * shape

    return factor
