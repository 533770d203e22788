"""The recipe schema: nested dataclasses whose fields carry their defaults and help.

This is the only place defaults live (with the sections of ``distill.sections`` and each
method's own section in ``distill.methods``). The ``method`` section is whichever registered
method ``method.name`` names (the field's ``registry``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from distill.config.fields import dataset_size
from distill.methods import DEFAULT_METHOD, METHODS, MethodConfig
from distill.sections import LoraConfig, Timestep, setting
from distill.trackers import check_trackers


@dataclass
class TeacherConfig:
    path: str = setting(
        "models/digits-teacher",
        "diffusers checkpoint of the teacher: a hub id or a local pipeline directory (model_index.json)",
        path="pipeline", revision="revision",
    )
    revision: Optional[str] = setting(None, "hub revision (branch, tag or commit) of `path`")
    guidance_scale: Optional[float] = setting(
        1.0, "guidance of the real score: the CFG scale (1 = none), or the embedded scale of a guidance-distilled "
        "teacher (FLUX.1-dev; its students and fake scores run at the teacher's own, 3.5); null = the teacher's own")
    dtype: Literal["float32", "float16", "bfloat16"] = setting(
        "float32", "dtype of the frozen teacher parts (denoiser, VAE, text encoders); trainable copies stay float32"
    )
    offload: Literal["none", "encoders", "all"] = setting(
        "none", "frozen teacher parts kept in CPU memory and moved to the accelerator only while they run: none, "
        "encoders (text encoders and VAE) or all (the teacher's denoiser too; full students only, since a LoRA role's "
        "base is the teacher's denoiser). Saves their memory for a transfer per use; a no-op on a CPU run"
    )


@dataclass
class StudentConfig:
    timesteps: list[Timestep] = setting(
        [500],
        "the student's fixed timesteps, descending; each step denoises pure noise (first) or the previous "
        "output re-noised to that timestep. One step conditioned at t=500 works on digits; [999, 749, 499, 249] "
        "is the usual 4-step schedule. An entry may be a noise level instead, {sigma: s} (sigma_t / alpha_t) or "
        "{logsnr: l}, resolved to the teacher's nearest timestep at load, so the recipe holds on other schedules",
    )
    lora: LoraConfig = setting(LoraConfig(), "train the student as a LoRA of the teacher (rank > 0) instead of all weights")
    backward_simulation: bool = setting(
        True,
        "multi-step training inputs come from running the student itself (DMD2 §4.5) rather than noised real images",
    )


@dataclass
class DataConfig:
    dataset: Literal["digits", "classes", "prompts", "image_captions"] = setting(
        "digits",
        "training data: digits (the built-in scikit-learn digits), classes (class labels only, each of the teacher's "
        "classes 100 times per epoch: data-free distribution matching for class-conditional teachers such as DiT), "
        "prompts (text only: data-free distribution matching) or image_captions (images with captions: real images for "
        "the GAN and ADD)",
    )
    path: Optional[str] = setting(
        None, "prompts: a .txt file (one prompt per line) or an HF datasets directory / hub id; image_captions: an "
        "imagefolder directory (metadata.jsonl captions), a parquet file or directory, or an HF datasets hub id",
        path="data", used=lambda d: d.dataset in ("prompts", "image_captions"),
    )
    split: str = setting("train", "split of an HF dataset")
    prompt_column: str = setting("text", "column holding the prompt / caption")
    image_column: str = setting("image", "column holding the image (image_captions)")
    resolution: Optional[int] = setting(
        None, "image_captions: side of the square training images (resize the short side, centre crop); null = the teacher's"
    )
    cache_dir: Optional[str] = setting(
        None, "opt-in cache of VAE latents and text embeddings on disk (keyed by data and teacher), so long runs "
        "encode once; null = encode every batch", path="output",
    )
    batch_size: int = setting(64, "samples per process per micro-batch", at_most=dataset_size)
    on_bad_item: Literal["error", "skip"] = setting(
        "error", "image_captions: what an item that cannot be trained on does (an unreadable or truncated image, no "
        "caption, an image smaller than data.min_image_size): error stops at the first one read, naming it; skip reads "
        "every item once before training (one decoding pass) and leaves the bad ones out, counted in the log, "
        "losses.jsonl (data/skipped_items) and the run's data_report.json. Greyscale, 16-bit and RGBA images are "
        "converted (alpha over white), not bad")
    min_image_size: Optional[int] = setting(
        None, "image_captions: the smallest short side of an image taken; smaller ones are bad items (null: the "
        "training resolution, so nothing is upscaled; 0: take any size, upscaling small ones)", minimum=0)
    num_workers: int = setting(
        0, "DataLoader worker processes that read and decode items ahead of the step (0: in the training process). "
        "The order stays a pure function of the step, so resuming reads what the uninterrupted run read"
    )


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "adamw8bit"] = setting(
        "adamw", "adamw (torch.optim.AdamW) or adamw8bit (bitsandbytes' AdamW8bit: optimizer state in 8 bits, a "
        "quarter of AdamW's; CUDA only, pip install 'distill[gpu]')"
    )
    lr: float = setting(1e-5, "learning rate (after warm-up; see decay)")
    betas: list[float] = setting([0.0, 0.999], "Adam betas")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup_steps: int = setting(0, "linear learning-rate warm-up, in optimizer steps")
    decay: Literal["constant", "cosine", "linear"] = setting(
        "constant", "learning rate after warm-up: constant, or a cosine / linear decay from lr to decay_to x lr at "
        "train.max_steps (the critic's horizon is its own updates: max_steps x method.critic_updates; a run resumed with "
        "another max_steps decays over the new one from where it is)")
    decay_to: float = setting(0.0, "the decayed learning rate at train.max_steps, as a fraction of lr", minimum=0.0)


@dataclass
class TrainConfig:
    max_steps: int = setting(1000, "student updates to run")
    max_minutes: Optional[float] = setting(
        None, "wall-clock budget: stop (and checkpoint) after this many minutes even if max_steps is not reached"
    )
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step, for both optimizers")
    mixed_precision: Literal["no", "fp16", "bf16"] = setting("no", "mixed precision, through Accelerate")
    max_grad_norm: float = setting(1.0, "gradient clipping norm for student and critic (0 disables)")
    max_nonfinite_steps: int = setting(
        5, "an update whose loss or gradient is not finite is skipped (no weight moves) and counted; after this many "
        "student steps in a row with a skipped update the run stops, its last checkpoint intact"
    )
    gradient_checkpointing: bool = setting(
        False, "recompute the student's and fake score's activations in the backward pass (less memory, ~30% slower); "
        "UNets and the DiT, PixArt, SD3 and FLUX transformers, full copies and LoRA roles alike"
    )
    compile: bool = setting(
        False, "torch.compile the denoisers (teacher / shared base, full student and fake score copies) in place. "
        "Pays a compile of minutes on the first steps, and each new input shape recompiles; worth it on GPUs for long "
        "runs, not on a CPU (the digits UNet took ~380 s to compile on 2 cores and then ran slower)"
    )
    ema_decay: float = setting(
        0.99, "EMA decay of the student's weights (0 disables EMA); with train.ema_warmup it holds only from the step "
        "the warm-up reaches it (0.99 from ~890, 0.999 from ~9,000)")
    ema_warmup: bool = setting(
        True, "diffusers' EMA warm-up (true): the decay at step t is min(ema_decay, (1 + t) / (10 + t)), an average over "
        "about the last t / 9 steps, so below ~890 steps any two decays >= 0.99 give the same student; false: "
        "ema_decay from the second update on (the average starts at the first update's weights)")
    checkpoint_every: int = setting(200, "save a resumable checkpoint every N student steps")
    keep_checkpoints: int = setting(2, "how many recent checkpoints to keep")
    log_every: int = setting(10, "log losses every N student steps")
    log_with: list[str] = setting(
        ["tensorboard"], "experiment trackers, through Accelerate: tensorboard, wandb, comet_ml, mlflow, aim (each "
        "where installed); [] for losses.jsonl alone", check=check_trackers)
    sample_every: int = setting(200, "write a sample grid every N student steps (0 disables)")
    num_grid_samples: int = setting(64, "images in each sample grid")


@dataclass
class EvalConfig:
    features: list[str] = setting(
        ["classifier"],
        "feature spaces for FD, KID, precision and recall: classifier (eval.classifier's features), dinov2 "
        "(FD-DINOv2, eval.dinov2) and/or inception (classic FID; needs torch-fidelity and network); the first "
        "one's FD picks the best checkpoint. [] disables scoring",
    )
    classifier: Optional[str] = setting(
        "models/digits-classifier",
        "classifier (hub id or local dir) for the classifier feature space and class accuracy (null: none)", path="model",
    )
    dinov2: str = setting("facebook/dinov2-large", "DINOv2 checkpoint (hub id or local dir) for the dinov2 feature space",
                          path="model", used=lambda e: "dinov2" in e.features)
    clip: Optional[str] = setting(
        None, "CLIP model (hub id or local dir, e.g. openai/clip-vit-large-patch14) for the CLIP score of text-conditioned "
        "samples against their prompts (null: no CLIP score)", path="model",
    )
    cmmd: bool = setting(
        False, "also score CMMD (Jayasumana et al. 2024: MMD of CLIP image embeddings against the reference images) "
        "with eval.clip's image tower; the paper's model is openai/clip-vit-large-patch14-336")
    num_samples: int = setting(2000, "samples drawn for the final scores (metrics.json)")
    every: int = setting(
        0, "score the EMA student every N student steps during training, log it and keep the best checkpoint (0: only at the end)"
    )
    every_num_samples: Optional[int] = setting(
        None, "samples drawn for each evaluation during training (null: eval.num_samples, so the periodic scores, "
        "the best checkpoint and the final scores compare: FD reads higher on fewer samples, on the digits benchmark "
        "by about 0.4 at 1,000 against 2,000)")
    rescore_top: int = setting(
        0, "at the end of training, score the N students with the lowest periodic FD (eval.every; kept meanwhile in "
        "checkpoints/shortlist/, N students on disk) again on eval.rescore_draws fresh draws of eval.num_samples "
        "each, and make the lowest mean FD checkpoints/best. 0: checkpoints/best is the lowest periodic score, the "
        "minimum of single draws, which once the FD curve is flat picks noise as often as a better student. "
        "Without periodic scores (eval.every: 0) there is nothing to shortlist and no best: the setting is inert, so "
        "a recipe that sets it still runs with evaluation off",
        minimum=0)
    rescore_draws: int = setting(
        3, "fresh draws per shortlisted student (eval.rescore_top), on seeds the periodic scores and "
        "scripts/bench_quality.py do not use", minimum=1)
    nearest_k: int = setting(3, "k of the k-nearest-neighbour manifolds of precision and recall (Kynkäänniemi et al. 2019)")
    kid_subsets: int = setting(100, "random subsets averaged by KID")
    kid_subset_size: int = setting(1000, "samples per KID subset (capped at the smaller set's size)")
    cache_dir: str = setting("~/.cache/distill/reference", "where reference-set features are cached, keyed by dataset and extractor",
                             path="output")
    batch_size: int = setting(500, "generation and feature-extraction batch for scoring")

    def periodic_num_samples(self) -> int:
        """Samples of each evaluation during training: eval.every_num_samples, null ones eval.num_samples."""
        return self.num_samples if self.every_num_samples is None else self.every_num_samples


@dataclass
class OptimConfig:
    student: OptimizerConfig = setting(OptimizerConfig(lr=1e-5), "optimizer of the student (generator)")
    critic: OptimizerConfig = setting(
        OptimizerConfig(lr=1e-4), "optimizer of the critic: fake score network and GAN head"
    )


@dataclass
class Config:
    output_dir: str = setting("runs/digits-dmd2-1step", "run directory: checkpoints, logs, samples, scores", path="output")
    seed: int = setting(0, "seed of every random draw of the run", minimum=0, maximum=2**32 - 1)
    resume: Optional[str] = setting(
        None, "continue a run: 'latest' (newest complete checkpoint in output_dir; damaged newer ones are passed over) "
        "or a checkpoint directory", path="checkpoint",
    )
    teacher: TeacherConfig = setting(TeacherConfig(), "the pretrained model to distill")
    student: StudentConfig = setting(StudentConfig(), "the few-step generator")
    method: MethodConfig = field(
        default_factory=lambda: METHODS[DEFAULT_METHOD](),
        metadata={"help": "the distillation method and its losses: method.name picks a registered method, whose "
                          "section the other method.* keys are", "registry": METHODS},
    )
    data: DataConfig = setting(DataConfig(), "training data")
    optim: OptimConfig = setting(OptimConfig(), "optimizers")
    train: TrainConfig = setting(TrainConfig(), "training loop")
    eval: EvalConfig = setting(EvalConfig(), "scoring at the end of training")


def check_scale_settings(config: Config) -> None:
    """The memory and speed switches (``teacher.offload``, ``optim.*.name``, ``data.num_workers``),
    before any weights load."""
    from importlib.util import find_spec

    from distill.sections import fail

    if config.data.num_workers < 0:
        fail("data.num_workers", f"must not be negative, got {config.data.num_workers}")
    lora_roles = config.student.lora.rank > 0 or getattr(getattr(config.method, "fake_score_lora", None), "rank", 0) > 0
    if config.teacher.offload == "all" and lora_roles:
        fail("teacher.offload", "'all' moves the teacher's denoiser off the device between uses, but LoRA roles train on "
             "it (it is their shared base): use offload 'encoders', or full copies (LoRA ranks 0)")
    for name in ("student", "critic"):
        if getattr(config.optim, name).name == "adamw8bit" and find_spec("bitsandbytes") is None:
            fail(f"optim.{name}.name", "adamw8bit needs bitsandbytes, which is not installed: pip install "
                 "'distill[gpu]' (CUDA machines), or use adamw")
