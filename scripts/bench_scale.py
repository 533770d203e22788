"""Memory and time of DMD2 training at real model sizes, through the real trainer.

    python scripts/bench_scale.py --plan                                   # what each row needs, computed; runs nothing
    OMP_NUM_THREADS=2 python scripts/bench_scale.py --models sd15-half sd15 sdxl sd3 flux --out bench-scale-cpu.json
    python scripts/bench_scale.py --dry-run                                # every model and mode at tiny width, 2 steps
    python scripts/bench_scale.py --table bench-scale-cpu.json             # the rows of --out as a markdown table
    python scripts/bench_scale.py --models sdxl --modes shared full --dtype bfloat16 --resolution 1024 --steps 3   # GPU

Builds each denoiser from its published config (``scripts/scale_configs/``, random weights,
nothing downloaded) into a pipeline directory with one-layer stand-in text encoders and VAE
of the real output widths, then trains it with the model's recipe (``distill.train``'s
trainer, in a fresh Python per row so each peak is its own) in three modes:

    full     teacher + full student + full fake score (student.lora.rank=0, method.fake_score_lora.rank=0)
    student  LoRA student on the teacher's base + full fake score
    shared   LoRA student and LoRA fake score on the teacher's base: one denoiser for three roles

Each row reports the peak memory (CPU: resident set, ``ru_maxrss``, above the process after
its imports; CUDA: ``torch.cuda.max_memory_allocated``), the bytes of every live network's
weights (shared storages once), of the weights the optimizers train and of their state, and
the time of a step by phase from the run's own ``times.jsonl`` (the first step, warm-up,
left out; ``best``: the fastest step against the fastest replays, less disturbed by other jobs
on a shared machine). ``fwd+bwd alone``: every denoiser call of those steps (network, adapter, batch,
grad or not, and the module it stopped after where it ended part-way, as the GAN heads' forwards
do) recorded, then each kind replayed alone, forward (and backward where the step
backpropagated it) on the inputs the step gave it, and summed over the calls; ``step /
alone`` is the overhead of everything else (data, optimizer, EMA, logging, Python).

Before a row starts its memory is computed from the parameter counts (``--plan`` prints
it): a row that would need more than ``--max-gb`` is not run, and the table gives its
computed parts (weights, gradients, optimizer state) instead. On the CPU the recipe's
resolution is reduced (``cpu_resolution``), the batch is 1, ``method.critic_updates`` is 1
and the teacher runs in float32 (bfloat16 matmuls run ~40x slower than float32 on a CPU
without bf16 instructions); ``--resolution``, ``--batch-size``, ``--critic-updates`` and
``--dtype`` set them. The ``sd15-half`` model is SD 1.5 with every channel count halved
(a quarter of the weights): small enough to run all three modes on a 24 GB machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "scripts" / "scale_configs"
GB = 2**30
MODES = {"full": (False, False), "student": (True, False), "shared": (True, True)}  # (student LoRA, fake score LoRA)
def _adapter(module: str, name: str):
    return lambda: getattr(__import__(f"distill.teachers.{module}", fromlist=[name]), name)


ADAPTERS = {"sd": _adapter("stable_diffusion", "StableDiffusionTeacher"), "sdxl": _adapter("stable_diffusion", "StableDiffusionXLTeacher"),
            "sd3": _adapter("sd3", "StableDiffusion3Teacher"), "flux": _adapter("flux", "FluxTeacher")}
MODELS = {  # config, pipeline family, recipe, overrides of the recipe, CPU resolution
    "sd15-half": dict(config="sd15_unet.json", family="sd", recipe="sd15-dmd2-4step-lora.yaml", cpu_resolution=128,
                      scale_channels=0.5),
    "sd15": dict(config="sd15_unet.json", family="sd", recipe="sd15-dmd2-4step-lora.yaml", cpu_resolution=128),
    "sdxl": dict(config="sdxl_unet.json", family="sdxl", recipe="sdxl-dmd2-4step-lora.yaml", cpu_resolution=64),
    "sd3": dict(config="sd3_medium_transformer.json", family="sd3", recipe="sd3-dmd2-4step-lora.yaml", cpu_resolution=64),
    "flux": dict(config="flux1_dev_transformer.json", family="flux", recipe="flux-dmd2-4step-lora.yaml", cpu_resolution=64),
}


# ------------------------------------------------------------------------------------------ configs and pipelines
def denoiser_config(model: str, tiny: bool) -> dict:
    """The published config (``scale_configs``), scaled for ``sd15-half``, or shrunk to a tiny
    width and depth for ``--dry-run`` (the same classes, conditioning widths and code paths)."""
    spec = MODELS[model]
    config = json.loads((CONFIGS / spec["config"]).read_text())
    if "scale_channels" in spec:
        config["block_out_channels"] = [int(c * spec["scale_channels"]) for c in config["block_out_channels"]]
    if not tiny:
        return config
    family = spec["family"]
    if family == "sd":
        config.update(block_out_channels=[32, 64, 64, 64], attention_head_dim=8, layers_per_block=1)
    elif family == "sdxl":
        config.update(block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 8], transformer_layers_per_block=[1, 1, 1],
                      layers_per_block=1)
    elif family == "sd3":
        config.update(num_layers=2, attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16)
    else:
        config.update(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=[4, 6, 6])
    return config


def _denoiser_class(config: dict):
    import diffusers

    return getattr(diffusers, config["_class_name"])


def count_parameters(model: str, tiny: bool, lora_rank: int, targets: list[str]) -> tuple[int, int]:
    """(denoiser parameters, parameters of one LoRA of ``lora_rank`` on ``targets``), from a
    network built on the meta device (no memory, no time)."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    config = denoiser_config(model, tiny)
    with torch.device("meta"):
        network = _denoiser_class(config).from_config(config)
    total = sum(p.numel() for p in network.parameters())
    inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=targets), network)
    lora = sum(p.numel() for n, p in network.named_parameters() if "lora_" in n)
    return total, lora


def _clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(vocab_file=str(Path(folder) / "vocab.json"), merges_file=str(Path(folder) / "merges.txt"),
                                  model_max_length=max_length)
    special = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    return tokenizer, len(vocab), special


def _clip(width: int, projection: bool, vocab_size: int, special: dict):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=8, max_position_embeddings=77, projection_dim=width, **special)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5():
    from tokenizers import Tokenizer, models
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + [chr(c) for c in range(33, 127)]
    tokenizer = T5TokenizerFast(tokenizer_object=Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=2)),
                                eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=4096, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    return tokenizer, encoder


def _vae(latent_channels: int, scaling: float, shift: float | None):
    """An 8x-downsampling VAE of 8 channels per block: the real latent shape and scaling."""
    from diffusers import AutoencoderKL

    extra = {} if shift is None else dict(shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         norm_num_groups=8, layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=scaling, **extra)


def build_pipeline(model: str, path: Path, tiny: bool, dtype: str) -> None:
    """A pipeline directory around the denoiser of ``model`` (random weights saved in
    ``dtype``) with stand-in text encoders and VAE."""
    import diffusers
    import torch

    torch.manual_seed(0)
    config = denoiser_config(model, tiny)
    denoiser = _denoiser_class(config).from_config(config).to(getattr(torch, dtype))
    tokenizer, vocab_size, special = _clip_tokenizer()
    family = MODELS[model]["family"]
    if family == "sd":
        pipe = diffusers.StableDiffusionPipeline(
            unet=denoiser, vae=_vae(4, 0.18215, None), text_encoder=_clip(768, False, vocab_size, special), tokenizer=tokenizer,
            scheduler=diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif family == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(
            unet=denoiser, vae=_vae(4, 0.13025, None), text_encoder=_clip(768, False, vocab_size, special),
            text_encoder_2=_clip(1280, True, vocab_size, special), tokenizer=tokenizer, tokenizer_2=tokenizer,
            scheduler=diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                       steps_offset=1, timestep_spacing="leading"),
            force_zeros_for_empty_prompt=True)
    elif family == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=denoiser, vae=_vae(16, 1.5305, 0.0609), text_encoder=_clip(768, True, vocab_size, special),
            text_encoder_2=_clip(1280, True, vocab_size, special), tokenizer=tokenizer, tokenizer_2=tokenizer,
            text_encoder_3=None, tokenizer_3=None, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    else:
        t5_tokenizer, t5 = _t5()
        pipe = diffusers.FluxPipeline(
            transformer=denoiser, vae=_vae(16, 0.3611, 0.1159), text_encoder=_clip(768, False, vocab_size, special),
            tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                                max_shift=1.15, base_image_seq_len=256,
                                                                max_image_seq_len=4096))
    pipe.save_pretrained(path, safe_serialization=True)


def write_data(root: Path, resolution: int) -> dict[str, Path]:
    """8 random images with captions (an imagefolder) and a prompt file."""
    import numpy as np
    from PIL import Image

    images = root / f"images-{resolution}"
    if not (images / "metadata.jsonl").is_file():
        images.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        rows = []
        for i in range(8):
            Image.fromarray((rng.random((resolution, resolution, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
            rows.append({"file_name": f"{i}.png", "text": f"a photograph of thing number {i}"})
        (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = root / "prompts.txt"
    prompts.write_text("".join(f"a photograph of thing number {i}\n" for i in range(8)))
    return {"image_captions": images, "prompts": prompts}


# ------------------------------------------------------------------------------------------ the plan
def recipe_of(model: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / "recipes" / MODELS[model]["recipe"]).read_text())


def plan_row(model: str, mode: str, *, tiny: bool, dtype: str, ema: bool, optimizer_bytes: int = 8) -> dict:
    """The memory a row needs, computed from the parameter counts: weights (teacher in
    ``dtype``, full copies and adapters in float32), gradients (the larger trained network's:
    each update frees them), optimizer state (AdamW: two float32 moments per trained weight),
    EMA, and the student copy a checkpoint makes."""
    recipe = recipe_of(model)
    overrides = MODELS[model].get("overrides", {})
    rank = recipe["student"]["lora"]["rank"]
    targets = overrides.get("student.lora.target_modules") or recipe["student"]["lora"].get("target_modules") \
        or ADAPTERS[MODELS[model]["family"]]().lora_target_modules  # null in a recipe: the adapter's default
    params, lora = count_parameters(model, tiny, rank, targets)
    student_lora, fake_lora = MODES[mode]
    teacher_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    trained_student = lora if student_lora else params
    trained_fake = lora if fake_lora else params
    weights = params * teacher_bytes + 4 * ((not student_lora) * params + (not fake_lora) * params) \
        + 4 * lora * (student_lora + fake_lora + student_lora)  # + the eval adapter a LoRA student keeps
    grads = 4 * max(trained_student, trained_fake)
    optimizer = optimizer_bytes * (trained_student + trained_fake)
    extra = 4 * trained_student * ema + 4 * (0 if student_lora else params)  # EMA; the checkpoint's student copy
    return dict(model=model, mode=mode, params=params, lora_params=lora, trained=trained_student + trained_fake,
                weights_gb=weights / GB, grads_gb=grads / GB, optimizer_gb=optimizer / GB, extra_gb=extra / GB,
                total_gb=(weights + grads + optimizer + extra) / GB)


# ------------------------------------------------------------------------------------------ one row, in a fresh process
def _rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _unique_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class CallRecorder:
    """Every forward of the denoisers while ``active``: (network, adapter on, grad enabled,
    weights trained, batch), with the first inputs of each kind kept for ``replay``."""

    def __init__(self, trainer):
        import torch

        from distill.offload import teacher_modules
        from distill.students import LoraRole

        self.active = False
        self.counts: dict[tuple, int] = {}
        self.inputs: dict[tuple, tuple] = {}
        unwrap = trainer.accelerator.unwrap_model
        student = unwrap(trainer.student)
        critic = unwrap(trainer.critic) if trainer.critic is not None else None
        fake = getattr(critic, "denoiser", None)
        base, _ = teacher_modules(trainer.teacher)
        self.roles = {r.adapter: r for r in (student, fake) if isinstance(r, LoraRole)}
        self.networks = {"teacher": base}
        for name, network in (("student", student), ("fake_score", fake)):
            if network is not None and not isinstance(network, LoraRole):
                self.networks[name] = network
        self.handles = [m.register_forward_pre_hook(self._hook(name), with_kwargs=True) for name, m in self.networks.items()]
        # a call that ends part-way (the GAN's heads stop at the bottleneck: distill.discriminators.capture)
        # never reaches its network's forward hook; the last module that finished is where it stopped
        self.names = {name: {id(m): n for n, m in network.named_modules()} for name, network in self.networks.items()}
        self.pending, self.last = None, None
        self.handles += [m.register_forward_hook(lambda *_: self._finish(None)) for m in self.networks.values()]
        self.handles.append(torch.nn.modules.module.register_module_forward_hook(self._finished_module))

    def _trained(self, name: str, adapter: str | None) -> bool:
        params = self.roles[adapter].parameters() if adapter else self.networks[name].parameters()
        return any(p.requires_grad for p in params)

    def _hook(self, name: str):
        import torch

        from distill.students.roles import _ACTIVE

        def record(module, args, kwargs):
            if not self.active:
                return
            self._finish(self.last)  # the call before, if it never finished, stopped there
            adapter = module.__dict__.get(_ACTIVE)
            x = args[0] if args else kwargs["hidden_states"]
            key = (adapter or name, adapter, torch.is_grad_enabled(), self._trained(name, adapter), int(x.shape[0]))
            clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            self.pending = (name, key, tuple(clone(a) for a in args),
                            {k: ({kk: clone(vv) for kk, vv in v.items()} if isinstance(v, dict) else clone(v))
                             for k, v in kwargs.items()})
        return record

    def _finished_module(self, module, args, output):
        if self.pending is not None and id(module) in self.names[self.pending[0]]:  # not the heads after it
            self.last = module

    def _finish(self, stopped_at) -> None:
        """Count the pending call: whole (``stopped_at`` None) or ended after module ``stopped_at``."""
        if self.pending is None:
            return
        name, key, args, kwargs = self.pending
        self.pending = None
        key = (*key, self.names[name].get(id(stopped_at)) if stopped_at is not None else None)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.inputs.setdefault(key, (name, args, kwargs))

    def replay(self, repeats: int = 2) -> dict[tuple, tuple[float, float]]:
        """Seconds of each recorded kind of call run alone (the mean and the least of
        ``repeats``): forward,
        and backward where the step ran it with grad (into the trained weights, or into the
        input where the network was frozen, as the GAN term's gradient reaches the sample)."""
        import torch

        from distill.discriminators import capture
        from distill.students.roles import _adapters_on

        self._finish(self.last)
        for handle in self.handles:
            handle.remove()
        cuda = torch.cuda.is_available()
        seconds = {}
        for key, (name, args, kwargs) in self.inputs.items():
            _, adapter, grad, trained, _, stop = key
            network = self.networks[name]
            params = list(self.roles[adapter].parameters() if adapter else network.parameters())
            saved = [p.requires_grad for p in params]
            for p in params:
                p.requires_grad_(trained)
            times = []
            for _ in range(repeats + 1):  # the first is a warm-up
                call_args = list(args)
                if grad and not trained:
                    if call_args:
                        call_args[0] = call_args[0].detach().requires_grad_(True)
                    else:
                        kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                with _adapters_on(self.networks["teacher"], adapter), torch.set_grad_enabled(grad):
                    if stop is None:
                        out = network(*call_args, **kwargs)
                        out = out.sample if hasattr(out, "sample") else out[0]
                    else:  # as the step ran it: to the module it stopped after
                        _, (out,) = capture([network.get_submodule(stop)], lambda: network(*call_args, **kwargs), stop=True)
                    if grad:
                        out.float().sum().backward()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                for p in params:
                    p.grad = None
            for p, flag in zip(params, saved):
                p.requires_grad_(flag)
            seconds[key] = (sum(times[1:]) / repeats, min(times[1:]))
        return seconds


def child(argv: list[str]) -> None:
    """Train one row through the trainer and print one JSON line of measurements."""
    import peft  # noqa: F401  (imported in every row: the same baseline after imports)
    import torch

    from distill import config as config_lib
    from distill.offload import teacher_modules
    from distill.trainer import DistillTrainer

    recipe, run = argv[0], Path(argv[1])
    overrides = argv[2:]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = _rss_bytes()
    config = config_lib.load(recipe, overrides)
    trainer = DistillTrainer(config)
    trainer.setup()
    recorder = CallRecorder(trainer)
    step_fn, steps_seen = trainer._train_step, []

    def counted_step(step):
        recorder.active = len(steps_seen) >= 1  # the first step is a warm-up
        steps_seen.append(step)
        return step_fn(step)

    trainer._train_step = counted_step
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_bytes() - baseline
    recorder.active = False

    unwrap = trainer.accelerator.unwrap_model
    denoiser, others = teacher_modules(trainer.teacher)
    modules = [denoiser, *others, unwrap(trainer.student)] + ([unwrap(trainer.critic)] if trainer.critic is not None else [])
    weights = _unique_bytes(t for m in modules for t in [*m.parameters(), *m.buffers()])
    optimizers = [o for o in (trainer.optimizer_s, trainer.optimizer_c) if o is not None]
    trained = [p for o in optimizers for g in o.param_groups for p in g["params"]]
    state = [v for o in optimizers for s in o.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    times = [json.loads(line) for line in (run / "times.jsonl").read_text().splitlines()][1:]
    phases = {k: sum(t[k] for t in times) / len(times) for k in times[0]} if times else {}
    alone = recorder.replay()
    counted = max(len(steps_seen) - 1, 1)
    alone_s = sum(recorder.counts[key] * seconds for key, (seconds, _) in alone.items()) / counted
    alone_min_s = sum(recorder.counts[key] * least for key, (_, least) in alone.items()) / counted
    calls = {f"{k[0]}{'/grad' if k[2] else ''}{'/trained' if k[3] else ''}/b{k[4]}{f'/to:{k[5]}' if k[5] else ''}": v / counted
             for k, v in recorder.counts.items()}
    print("BENCH_ROW " + json.dumps({
        "peak_gb": peak / GB, "weights_gb": weights / GB, "trained_params": sum(p.numel() for p in trained),
        "trained_gb": _unique_bytes(trained) / GB, "optimizer_gb": _unique_bytes(state) / GB, "phases": phases,
        "alone_s": alone_s, "alone_min_s": alone_min_s, "step_min_s": min(t["time/step_s"] for t in times) if times else None,
        "calls_per_step": calls, "steps_timed": len(times),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "threads": torch.get_num_threads(),
    }), flush=True)


# ------------------------------------------------------------------------------------------ the parent
def row_overrides(model: str, mode: str, *, teacher: Path, data: dict, run: Path, args) -> list[str]:
    recipe = recipe_of(model)
    dataset = recipe["data"]["dataset"]
    student_lora, fake_lora = MODES[mode]
    rank = recipe["student"]["lora"]["rank"]
    values = {
        "teacher.path": teacher, "teacher.dtype": args.dtype, "teacher.offload": args.offload,
        "data.path": data[dataset], "data.batch_size": args.batch_size, "data.num_workers": args.num_workers,
        "output_dir": run, "student.lora.rank": rank * student_lora, "method.fake_score_lora.rank": rank * fake_lora,
        "method.critic_updates": args.critic_updates, "train.max_steps": args.steps, "train.log_every": 1,
        "train.checkpoint_every": args.steps, "train.sample_every": 0, "train.max_minutes": "null",
        "train.mixed_precision": args.mixed_precision, "train.gradient_checkpointing": str(args.gradient_checkpointing).lower(),
        "train.compile": str(args.compile).lower(), "optim.student.warmup_steps": 0, "optim.critic.warmup_steps": 0,
        "optim.student.name": args.optimizer, "optim.critic.name": args.optimizer,
        "eval.every": 0, "eval.features": "[]", "eval.clip": "null", **MODELS[model].get("overrides", {}),
    }
    values["data.resolution"] = args.resolution_of(model)  # prompts too: the size the teacher generates at
    out = []
    for key, value in values.items():
        out.append(f"{key}={json.dumps(value) if isinstance(value, list) else value}")
    return out


PHASES = ("critic", "generator", "optimizer", "data", "ema", "log")


def markdown_table(rows: list[dict]) -> str:
    """The rows of ``--out`` as the table of docs/scale.md: measured where run, computed otherwise."""
    lines = ["| model | mode | setting | res | params trained | weights GB | optimizer GB | peak GB (computed) "
             "| step s | " + " | ".join(f"{p} s" for p in PHASES) + " | samples/s | fwd+bwd alone s | step / alone | best step / best alone |",
             "|" + "---|" * (13 + len(PHASES))]
    for r in rows:
        phases = r.get("phases") or {}
        step = phases.get("time/step_s")
        measured = "peak_gb" in r
        cells = [r["model"], r["mode"], r.get("setting") or r.get("dtype", ""), str(r.get("resolution", "")),
                 f"{(r['trained_params'] if measured else r['trained']) / 1e6:.1f}M",
                 f"{r['weights_gb']:.2f}", f"{r['optimizer_gb']:.2f}",
                 f"**{r['peak_gb']:.2f}** ({r['total_gb']:.2f})" if measured else f"not run ({r['total_gb']:.2f})"]
        if measured and step:
            cells += [f"{step:.2f}", *(f"{phases.get(f'time/{p}_s', 0.0):.2f}" for p in PHASES),
                      f"{phases['time/samples_per_s']:.3f}", f"{r['alone_s']:.2f}", f"{step / r['alone_s']:.2f}",
                      f"{r['step_min_s'] / r['alone_min_s']:.2f}" if r.get("alone_min_s") else ""]
        else:
            cells += ["" for _ in range(len(PHASES) + 5)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=4, help="student steps per row (the first is not timed)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: the model's CPU resolution on "
                                                                     "a CPU, the recipe's on CUDA)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--critic-updates", type=int, default=1)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="teacher dtype (default: float32 on a CPU, bfloat16 on CUDA)")
    parser.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"])
    parser.add_argument("--offload", default="none", choices=["none", "encoders", "all"])
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--max-gb", type=float, default=15.0, help="rows whose computed memory exceeds this are not run")
    parser.add_argument("--plan", action="store_true", help="print each row's computed memory; run nothing")
    parser.add_argument("--dry-run", action="store_true", help="tiny widths, 2 steps: checks every code path in minutes")
    parser.add_argument("--work", type=Path, default=None, help="where pipelines and runs go (default: a temporary dir)")
    parser.add_argument("--out", type=Path, default=None, help="append each row as a JSON line here")
    parser.add_argument("--table", type=Path, default=None, help="print the rows of this --out file as markdown; run nothing")
    parser.add_argument("--label", default="", help="a word for the table's setting column (e.g. bf16, ckpt)")
    args = parser.parse_args()
    if args.table is not None:
        print(markdown_table([json.loads(line) for line in args.table.read_text().splitlines()]))
        return

    import torch

    cuda = torch.cuda.is_available()
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    if args.dry_run:
        args.steps = 2
    args.resolution_of = lambda model: args.resolution or (
        64 if args.dry_run else recipe_of(model)["data"]["resolution"] if cuda else MODELS[model]["cpu_resolution"])
    ema = False  # the benchmarked recipes train without EMA
    rows = []
    for model in args.models:
        for mode in args.modes:
            plan = plan_row(model, mode, tiny=args.dry_run, dtype=args.dtype, ema=ema,
                            optimizer_bytes=2 if args.optimizer == "adamw8bit" else 8)
            plan["runs"] = plan["total_gb"] + 1.0 <= args.max_gb  # 1 GB: activations at the reduced size, libraries
            rows.append(plan)
            print(f"{model:9s} {mode:7s} params {plan['params'] / 1e6:8.1f}M  lora {plan['lora_params'] / 1e6:6.1f}M  "
                  f"weights {plan['weights_gb']:6.2f}  grads {plan['grads_gb']:6.2f}  optimizer {plan['optimizer_gb']:6.2f}  "
                  f"+ {plan['extra_gb']:5.2f}  = {plan['total_gb']:6.2f} GB  {'run' if plan['runs'] else 'computed only'}",
                  flush=True)
    if args.plan:
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for plan in rows:
        model, mode = plan["model"], plan["mode"]
        result = dict(plan, setting=args.label, resolution=args.resolution_of(model), dtype=args.dtype,
                      mixed_precision=args.mixed_precision, batch_size=args.batch_size, critic_updates=args.critic_updates)
        if plan["runs"]:
            teacher = work / f"{model}-{'tiny' if args.dry_run else 'full'}-{args.dtype}"
            if not (teacher / "model_index.json").is_file():
                subprocess.run([sys.executable, __file__, "--build", model, str(teacher), str(int(args.dry_run)), args.dtype],
                               check=True, env=env)
            data = write_data(work, args.resolution_of(model))
            run = work / "runs" / f"{model}-{mode}-{int(time.time())}"
            recipe = str(REPO / "recipes" / MODELS[model]["recipe"])
            command = [sys.executable, __file__, "--child", recipe, str(run),
                       *row_overrides(model, mode, teacher=teacher, data=data, run=run, args=args)]
            started = time.time()
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH_ROW ")]
            if done.returncode != 0 or not lines:
                result["error"] = done.stderr[-2000:]
                print(f"{model} {mode}: failed\n{done.stderr[-2000:]}", file=sys.stderr, flush=True)
            else:
                result.update(json.loads(lines[-1].removeprefix("BENCH_ROW ")))
                result["wall_s"] = time.time() - started
                step = result["phases"].get("time/step_s", float("nan"))
                print(f"{model} {mode}: peak {result['peak_gb']:.2f} GB, step {step:.2f} s, fwd+bwd alone "
                      f"{result['alone_s']:.2f} s (x{step / result['alone_s']:.2f})", flush=True)
        if args.out is not None:
            with open(args.out, "a") as f:
                f.write(json.dumps(result, default=str) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--build":
        build_pipeline(sys.argv[2], Path(sys.argv[3]), bool(int(sys.argv[4])), sys.argv[5])
    else:
        main()
