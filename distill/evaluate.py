"""How good is a sampler: the scoring harness behind ``distill eval``, the evaluation during
training and ``scripts/bench_quality.py``.

A *target* is anything that draws class-conditional (or unconditional) images from a seed
(``distill.sampling`` says what "draw" and "sample" mean):
a training run's student, an exported pipeline under its own few-step scheduler, or the
teacher under a stock diffusers solver (DDIM, DPM-Solver++) at a given step count, the
baseline a student has to beat. ``Scorer`` compares a target's samples with the dataset's
reference images in one or more feature spaces (``distill.features``): Fréchet distance,
KID, precision and recall, plus class accuracy and CMMD in CLIP image embeddings; ``measure_speed`` times the target.
Reference features are cached on disk, keyed by dataset and extractor weights.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from distill import metrics
from distill.atomic import atomic_file
from distill.data import reference_set
from distill.features import extract, load_classifier, load_extractor
from distill.runs import STUDENT, load_run
from distill.sampling import draw, draw_student, sample_teacher
from distill.schedulers import SOLVER_NAMES

# (num, seed, clamp=True) -> (images [0, 1], labels): class labels [num] (class-conditional), the
# prompts (text-conditioned: a list of num strings) or None (unconditional)
Draw = Callable[..., tuple[Tensor, "Tensor | list[str] | None"]]
BASELINE_STEPS = (1, 2, 4, 8, 25, 50)


# ---------------------------------------------------------------------------- reference features
def reference_features(extractor: nn.Module, *, dataset_key: str, images: Callable[[], Tensor], cache_dir: str | Path,
                       batch_size: int) -> Tensor:
    """Features of the reference images, read from ``cache_dir`` when this dataset was already
    seen by an extractor with the same weights, else extracted and cached (atomically)."""
    key = hashlib.sha256(f"{dataset_key}|{extractor.identity}".encode()).hexdigest()[:20]
    path = Path(os.path.expanduser(str(cache_dir))) / f"{dataset_key}-{key}.safetensors"
    from safetensors.torch import load_file, save_file

    if path.is_file():
        return load_file(path)["features"]
    features = extract(extractor, images(), batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as partial:
        save_file({"features": features.contiguous()}, partial, metadata={"dataset": dataset_key, "extractor": extractor.identity})
    return features


class Scorer:
    """Scores images against a dataset's reference set in each feature space.

    Returns ``{"fd_<space>", "kid_<space>", "kid_std_<space>", "precision_<space>",
    "recall_<space>", ...,  "cmmd", "class_accuracy", "clip_score", "num_samples"}``; class
    accuracy needs a classifier and class labels, the CLIP score a CLIP model and prompts,
    CMMD (``cmmd``) a CLIP model and reference images.
    ``reference`` = ``(key, images [N, C, H, W] in [0, 1])`` replaces the built-in
    ``reference_set(dataset)`` (e.g. the images of an image-caption dataset)."""

    def __init__(self, *, feature_spaces: list[str], dataset: str, classifier: str | None, dinov2: str,
                 cache_dir: str | Path, nearest_k: int, kid_subsets: int, kid_subset_size: int, batch_size: int,
                 device: torch.device | str = "cpu", clip: str | None = None, cmmd: bool = False,
                 reference: tuple[str, Tensor] | None = None):
        self.device = torch.device(device)
        self.nearest_k, self.kid_subsets, self.kid_subset_size, self.batch_size = nearest_k, kid_subsets, kid_subset_size, batch_size
        if (feature_spaces or cmmd) and reference is None:
            reference = reference_set(dataset)[:2]
        dataset_key, images = reference if reference is not None else (None, None)
        self.extractors = {name: load_extractor(name, classifier=classifier, dinov2=dinov2).to(self.device) for name in feature_spaces}
        self.references = {
            name: reference_features(extractor, dataset_key=dataset_key, images=lambda: images, cache_dir=cache_dir, batch_size=batch_size)
            for name, extractor in self.extractors.items()
        }
        if "classifier" in self.extractors:  # one load serves its features and class accuracy
            self.classifier = self.extractors["classifier"].classifier
        else:
            self.classifier = load_classifier(classifier).to(self.device) if classifier is not None else None
        self.cmmd_features = self.cmmd_reference = None
        if cmmd:
            if clip is None:
                raise ValueError("CMMD needs a CLIP model (eval.clip, distill eval --clip)")
            from distill.clip_features import ClipImageFeatures

            self.cmmd_features = ClipImageFeatures(clip).to(self.device)
            self.cmmd_reference = reference_features(self.cmmd_features, dataset_key=dataset_key, images=lambda: images,
                                                     cache_dir=cache_dir, batch_size=batch_size)
        self.clip = None
        if clip is not None:
            from transformers import CLIPModel, CLIPProcessor

            self.clip = (CLIPModel.from_pretrained(clip).eval().requires_grad_(False).to(self.device), CLIPProcessor.from_pretrained(clip))

    @torch.no_grad()
    def __call__(self, images: Tensor, labels: "Tensor | list[str] | None") -> dict[str, float]:
        """Scores of ``images`` [N, C, H, W] on the [0, 1] scale; ``labels``: their class labels [N],
        or their prompts (N strings) for the CLIP score, or None. ``out_of_range`` is the
        fraction of pixel values outside [0, 1] (outside [-1, 1] in the model's scale) before
        the images are clamped, as pipelines clamp them, for every other score."""
        scores: dict[str, float] = {"out_of_range": float(((images < 0) | (images > 1)).float().mean())}
        images = images.clamp(0, 1)
        for name, extractor in self.extractors.items():
            real, fake = self.references[name], extract(extractor, images, self.batch_size)
            scores[f"fd_{name}"] = metrics.frechet_distance(real, fake)
            scores[f"kid_{name}"], scores[f"kid_std_{name}"] = metrics.kernel_distance(real, fake, self.kid_subsets, self.kid_subset_size)
            scores[f"precision_{name}"], scores[f"recall_{name}"] = metrics.precision_recall(real, fake, self.nearest_k)
        if self.cmmd_features is not None:
            scores["cmmd"] = metrics.cmmd(self.cmmd_reference, extract(self.cmmd_features, images, self.batch_size))
        if self.clip is not None and isinstance(labels, list):
            scores["clip_score"] = metrics.clip_score(images, labels, *self.clip, batch_size=self.batch_size)
        if self.classifier is not None and isinstance(labels, Tensor):
            logits = torch.cat([self.classifier(part.to(self.device)) for part in images.split(self.batch_size)])
            scores["class_accuracy"] = metrics.class_accuracy(logits, labels)
        scores["num_samples"] = len(images)
        return scores

    def over_draws(self, images: Tensor, labels: "Tensor | list[str] | None", draws: int) -> dict[str, float]:
        """Scores averaged over ``draws`` disjoint equal parts of ``images`` (each scored as
        ``__call__`` scores it, so each part's FD has the bias of its own sample count), with
        the spread of each FD across the parts (``fd_<space>_sd``). FD on a few thousand
        samples varies from draw to draw by more than many differences worth measuring
        (on the digits benchmark, 2,000-sample FDs of one student ranged 2.2-3.0): the mean
        over draws is the figure to compare. ``num_samples`` is the samples per part."""
        if draws < 1 or len(images) % draws:
            raise ValueError(f"over_draws: {len(images)} images do not split into {draws} equal draws")
        size = len(images) // draws
        parts = [self(images[i * size:(i + 1) * size], None if labels is None else labels[i * size:(i + 1) * size])
                 for i in range(draws)]
        scores = {key: statistics.mean(part[key] for part in parts) for key in parts[0]}
        for name in self.extractors:
            values = [part[f"fd_{name}"] for part in parts]
            scores[f"fd_{name}_sd"] = statistics.stdev(values) if draws > 1 else 0.0
        scores["draws"] = draws
        return scores


# ---------------------------------------------------------------------------- targets
@dataclass
class Target:
    """Something that draws images (``distill.sampling``): ``draw(num, seed, clamp=True) ->
    (images [0, 1], labels)`` (``clamp=False``: on the [0, 1] scale, values outside it kept)."""

    name: str
    steps: int
    draw: Draw


class _Scheduler:
    """A scheduler-class stand-in whose ``from_config`` adds solver options."""

    def __init__(self, build: Callable):
        self.from_config = build


def _pipeline_draw(teacher, scheduler_class, steps: int, *, guidance_scale: float | None, batch_size: int, device,
                   prompts: list[str] | None = None) -> Draw:
    """``draw`` for a diffusers pipeline's denoiser under a stock scheduler loop."""

    def sample(noise: Tensor, cond: dict, generator: torch.Generator) -> Tensor:
        return sample_teacher(teacher, scheduler_class, steps, noise, cond, guidance_scale, generator)

    return lambda num, seed, clamp=True: draw(teacher, sample, num, seed, batch_size, device, prompts, clamp)


def _steps(steps: int) -> str:
    return f"{steps} step{'s' * (steps > 1)}"


def teacher_target(path: str, solver: str, steps: int, *, guidance_scale: float | None, batch_size: int, device="cpu",
                   revision: str | None = None, prompts: list[str] | None = None) -> Target:
    """The teacher (hub id or local pipeline directory) under DDIM or DPM-Solver++ (the flow
    Euler step and flow DPM-Solver++ for a flow-matching teacher: its adapter's
    ``baseline_solvers``); ``guidance_scale`` None: the network's own."""
    from distill.teachers import load_teacher

    if solver not in SOLVER_NAMES:
        raise ValueError(f"unknown solver {solver!r}; choose from {', '.join(SOLVER_NAMES)}")
    teacher = load_teacher(path, revision)
    teacher.to(device)
    target_draw = _pipeline_draw(teacher, _Scheduler(teacher.baseline_solvers()[solver]), steps,
                                 guidance_scale=guidance_scale, batch_size=batch_size, device=device, prompts=prompts)
    return Target(f"teacher, {teacher.solver_label(solver)}, {_steps(steps)}", steps, target_draw)


def export_target(path: str | Path, steps: int | None = None, *, batch_size: int, device="cpu",
                  prompts: list[str] | None = None) -> Target:
    """An exported pipeline directory under its own (few-step) scheduler, unguided (an
    embedded scale: the one it was trained at), at the size it was trained at; ``steps``
    defaults to the number the student was trained for (from the export's recipe)."""
    import yaml

    from distill.export import RECIPE_FILE
    from distill.teachers import load_pipeline, teacher_from_pipeline

    path = Path(path)
    recipe = yaml.safe_load((path / RECIPE_FILE).read_text()) if (path / RECIPE_FILE).is_file() else None
    pipe = load_pipeline(str(path))
    exported = teacher_from_pipeline(pipe, image_size=recipe["data"].get("resolution") if recipe else None)
    exported.to(device)
    if steps is None:
        steps = len(recipe["student"]["timesteps"]) if recipe else 1
    target_draw = _pipeline_draw(exported, type(pipe.scheduler), steps, guidance_scale=None, batch_size=batch_size,
                                 device=device, prompts=prompts)
    return Target(f"export {path.name}, {_steps(steps)}", steps, target_draw)


def run_target(run_dir: str | Path, checkpoint: str = "latest", steps: int | None = None, *, batch_size: int,
               device="cpu", prompts: list[str] | None = None) -> tuple[Target, dict]:
    """A training run's student (EMA weights of ``checkpoint``: 'latest', 'best' or a
    directory) under its own few-step sampler; also returns the run's resolved recipe."""
    run = load_run(run_dir, checkpoint)
    teacher = run_teacher(run.config, device)
    target = student_target(teacher, run.config, run.checkpoint / STUDENT, steps, batch_size=batch_size, device=device,
                            prompts=prompts, name=f"{Path(run_dir).name} ({run.checkpoint.name})")
    return target, run.recipe


def run_teacher(config, device="cpu"):
    """The teacher of a run's ``config``, loaded on ``device``: in the run's dtype on a GPU,
    float32 on the CPU, where half precision is slow or missing."""
    from distill.teachers import load_teacher

    dtype = getattr(torch, config.teacher.dtype) if torch.device(device).type == "cuda" else torch.float32
    teacher = load_teacher(config.teacher.path, config.teacher.revision, dtype=dtype, image_size=config.data.resolution)
    return teacher.to(device)


def student_target(teacher, config, directory: str | Path, steps: int | None = None, *, batch_size: int, device="cpu",
                   prompts: list[str] | None = None, name: str | None = None, adapter: str | None = None) -> Target:
    """A saved student (``directory``: a checkpoint's ``student/``, full or LoRA) of a run with
    ``config``, under the run's few-step sampler (its first ``steps`` timesteps), on
    ``teacher``; a LoRA is loaded onto the teacher's network as ``adapter`` (None:
    ``load_student``'s default)."""
    from distill.students import FewStepSampler, load_student

    student = load_student(teacher.denoiser, directory, **({} if adapter is None else {"adapter": adapter})).to(device)
    sampler = FewStepSampler(config.student.timesteps[: steps or None], teacher.schedule, teacher.step_noise)

    def target_draw(num: int, seed: int, clamp: bool = True):
        return draw_student(teacher, student, sampler, num, seed, batch_size, device, prompts, clamp)

    return Target(f"student {name or Path(directory).name}, {_steps(len(sampler))}", len(sampler), target_draw)


# ---------------------------------------------------------------------------- speed and tables
def _synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(target_draw: Draw, *, batch_size: int, device="cpu", warmup: int = 2, repeats: int = 5) -> dict[str, float]:
    """Latency of one image (batch 1) and throughput at ``batch_size``, each the median of
    ``repeats`` timed calls after ``warmup`` untimed ones (allocator, kernels, caches)."""

    def median_seconds(num: int) -> float:
        for _ in range(warmup):
            target_draw(num, 0)
        times = []
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            target_draw(num, 0)
            _synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    latency = median_seconds(1)
    batch_seconds = median_seconds(batch_size)
    return {
        "latency_ms": 1000 * latency,
        "images_per_second": batch_size / batch_seconds,
        "seconds_per_1000": 1000 * batch_seconds / batch_size,
    }


COLUMNS = [  # (metrics key, header, format)
    ("fd_{space}", "FD ↓", "{:.3f}"),
    ("fd_{space}_sd", "FD sd", "{:.3f}"),
    ("kid_{space}", "KID ↓", "{:.4f}"),
    ("precision_{space}", "precision ↑", "{:.3f}"),
    ("recall_{space}", "recall ↑", "{:.3f}"),
    ("cmmd", "CMMD ↓", "{:.3f}"),
    ("class_accuracy", "class acc. ↑", "{:.3f}"),
    ("out_of_range", "outside [-1, 1] ↓", "{:.1%}"),
    ("clip_score", "CLIP score ↑", "{:.2f}"),
    ("latency_ms", "latency ms ↓", "{:.1f}"),
    ("seconds_per_1000", "s / 1,000 ↓", "{:.2f}"),
]


def markdown_table(rows: list[dict], feature_spaces: list[str]) -> str:
    """One markdown table: a row per target (its ``name``), columns per feature space."""
    columns = []
    for key, header, fmt in COLUMNS:
        spaces = feature_spaces if "{space}" in key else [None]
        for space in spaces:
            label = header if space is None or len(feature_spaces) == 1 else f"{header} ({space})"
            columns.append((key.format(space=space), label, fmt))
    columns = [c for c in columns if any(c[0] in row for row in rows)]
    lines = ["| sampler | " + " | ".join(c[1] for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "" for key, _, fmt in columns]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
