"""Shared fixtures: tiny models built after a seed, saved to temporary directories, and
loaded back through the real loaders. Nothing here touches the network."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def build_tiny_teacher(path: Path, num_class_embeds: int | None = 11, prediction_type: str = "epsilon") -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_classifier(path: Path) -> Path:
    from distill.features import DigitsClassifier

    torch.manual_seed(0)
    DigitsClassifier(width=4).save_pretrained(path)
    return path


def build_tiny_dinov2(path: Path) -> Path:
    """A randomly initialised 2-layer DINOv2 (hidden 32, 28x28 inputs, 14x14 patches)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14)
    Dinov2Model(config).save_pretrained(path)
    return path


def write_tiny_clip_tokenizer(path: Path):
    """A byte-level CLIP tokenizer whose vocabulary the test writes: single characters, no
    merges, so any text tokenizes offline. Returns (tokenizer, vocab)."""
    import json

    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    return tokenizer, vocab


def _clip_special(vocab: dict) -> dict:
    return {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"]}


def build_tiny_clip(path: Path) -> Path:
    """A randomly initialised CLIP (one layer per tower, 16x16 images) with the test-written
    byte-level tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer, vocab = write_tiny_clip_tokenizer(path)
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, **_clip_special(vocab)),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return path


def _tiny_text_encoder(vocab: dict, hidden: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, projection_dim=hidden, **_clip_special(vocab))
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         sample_size=16, scaling_factor=0.5)


def _sd_scheduler(cls_name: str, prediction_type: str = "epsilon"):
    """The scheduler class the real checkpoints ship (SD 1.5: PNDM, SD 2.1: DDIM, SDXL:
    Euler) with their scaled-linear betas."""
    import diffusers

    cls = getattr(diffusers, cls_name)
    return cls.from_config(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                skip_prk_steps=True, timestep_spacing="leading"))


def build_tiny_sd(path: Path, prediction_type: str = "epsilon") -> Path:
    """A tiny Stable Diffusion 1.x / 2.x pipeline: 16x16 images, 8x8x4 latents (VAE scale 2,
    scaling factor 0.5), a 2-block cross-attention UNet, a 2-layer CLIP text encoder and the
    test-written tokenizer; ``prediction_type="v_prediction"`` is the SD 2.x-v layout."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer, vocab = write_tiny_clip_tokenizer(path / "_tokenizer_files")
    text_encoder = _tiny_text_encoder(vocab, 16)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=_sd_scheduler("PNDMScheduler" if prediction_type == "epsilon" else "DDIMScheduler", prediction_type), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_sdxl(path: Path) -> Path:
    """A tiny SDXL pipeline: two CLIP text encoders (the second with projection: pooled
    embeddings), size/crop time ids (``addition_embed_type="text_time"``), 16x16 images."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer, vocab = write_tiny_clip_tokenizer(path / "_tokenizer_files")
    text_encoder, text_encoder_2 = _tiny_text_encoder(vocab, 16), _tiny_text_encoder(vocab, 16, with_projection=True)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 16,
    )
    pipe = StableDiffusionXLPipeline(vae=_tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=_sd_scheduler("EulerDiscreteScheduler"),
                                     force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped without it (scripts/gpu_check.sh runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> Path:
    return build_tiny_dinov2(tmp_path_factory.mktemp("tiny") / "dinov2")


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd15")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd21-v", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "sdxl")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return build_tiny_teacher(tmp_path_factory.mktemp("tiny") / "teacher")


@pytest.fixture(scope="session")
def tiny_uncond_teacher(tmp_path_factory) -> Path:
    return build_tiny_teacher(tmp_path_factory.mktemp("tiny") / "uncond-teacher", num_class_embeds=None)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return build_tiny_classifier(tmp_path_factory.mktemp("tiny") / "classifier")


def tiny_overrides(teacher: Path, classifier: Path | None, output_dir: Path, **extra) -> list[str]:
    """Overrides that turn any digits recipe into a seconds-long run on the tiny models."""
    values = {
        "teacher.path": str(teacher),
        "eval.classifier": str(classifier) if classifier else "null",
        "eval.features": "[classifier]" if classifier else "[]",
        "eval.every": 0,
        "eval.num_samples": 40,
        "eval.every_num_samples": 20,
        "eval.kid_subset_size": 10,
        "eval.kid_subsets": 5,
        "eval.batch_size": 20,
        "output_dir": str(output_dir),
        "data.batch_size": 4,
        "train.max_steps": 2,
        "train.checkpoint_every": 1,
        "train.sample_every": 1,
        "train.num_grid_samples": 4,
        "train.log_every": 1,
        "train.max_minutes": "null",
        "method.critic_updates": 1,
    }
    values["eval.cache_dir"] = str(output_dir.parent / "reference-cache")
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


TEXT_PROMPTS = ["a red cat", "a blue dog", "a green tree", "the sea at night", "two birds", "a small house"]


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    """``prompts.txt`` and ``images/``: an imagefolder of 8 random 20x24 RGB images whose
    metadata.jsonl captions cycle through ``TEXT_PROMPTS``."""
    import json

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("text-data")
    (root / "prompts.txt").write_text("\n".join(TEXT_PROMPTS) + "\n")
    images = root / "images"
    images.mkdir()
    rows = []
    generator = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray((generator.random((20, 24, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": TEXT_PROMPTS[i % len(TEXT_PROMPTS)]})
    (images / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def latent_recipe_overrides(recipe: str, teacher: Path, data: Path, output_dir: Path, **extra) -> list[str]:
    """``tiny_overrides`` for a latent-teacher recipe on CPU: float32, no mixed precision or
    checkpointing, no warm-up, no scoring, and the recipe's kind of data from ``text_data``
    (16-pixel images)."""
    import yaml

    dataset = yaml.safe_load(open(recipe))["data"]["dataset"]
    values = {
        "teacher.dtype": "float32",
        "train.mixed_precision": "no",
        "train.gradient_checkpointing": "false",
        "optim.student.warmup_steps": 0,
        "optim.critic.warmup_steps": 0,
        "eval.features": "[]",
        "eval.clip": "null",
    }
    if dataset != "classes":
        values["data.path"] = str(data / ("images" if dataset == "image_captions" else "prompts.txt"))
        values["data.resolution"] = 16 if dataset == "image_captions" else "null"
    values.update(extra)
    return tiny_overrides(teacher, None, output_dir, **values)


def fake_checkpoint(run: Path, step: int) -> Path:
    """A complete checkpoint of ``run`` at ``step`` as the trainer lays one out, with tiny
    tensors (for the checks that read checkpoints, without training)."""
    import json

    from safetensors.torch import save_file

    from distill import checkpoints, runs

    path = checkpoints.checkpoint_path(run, step)
    (path / "student").mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, path / "model.safetensors")
    save_file({"w": torch.zeros(4)}, path / "student" / "diffusion_pytorch_model.safetensors")
    (path / "student" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    torch.save({"step": step}, path / "custom_checkpoint_0.pkl")
    runs.write_checkpoint_info(path, step=step, timesteps=[500], teacher="teacher")
    return path


def cache_hub_repo(cache: Path, repo_id: str, files: dict[str, str], repo_type: str = "model") -> Path:
    """Lay out ``files`` (name -> text) as huggingface_hub's cache holds a downloaded repo."""
    folder = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    for name, text in files.items():
        file = folder / "snapshots" / commit / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text)
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty local Hugging Face cache in place of the machine's (what an offline check reads)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def shipped_hub_models(hub_cache) -> Path:
    """Every hub model the shipped recipes and the schema's defaults name, as if downloaded once
    (their config files only: what the offline checks look for)."""
    import dataclasses

    import yaml

    from distill.config import Config, local_or_hub

    def strings(tree):
        if isinstance(tree, dict):
            return [s for v in tree.values() for s in strings(v)]
        if isinstance(tree, list):
            return [s for v in tree for s in strings(v)]
        return [tree] if isinstance(tree, str) else []

    values = strings(dataclasses.asdict(Config()))
    for recipe in (REPO / "recipes").glob("*.yaml"):
        values += strings(yaml.safe_load(recipe.read_text()))
    for repo_id in {v for v in values if "/" in v and local_or_hub(v) is None}:
        cache_hub_repo(hub_cache, repo_id, {"model_index.json": "{}", "config.json": "{}"})
    return hub_cache


def student_images_as_the_pipeline_draws(run_dir: Path, prompts=None, seed: int = 0, num: int | None = None):
    """A run's student (latest checkpoint) sampled as its stock pipeline samples it when called
    with ``generator=torch.Generator().manual_seed(seed)`` after ``torch.manual_seed(seed)``:
    the initial noise from that generator, each re-noising drawn as the pipeline's
    ``scheduler.step`` draws it (the adapter's ``step_noise``), from the same generator where the
    pipeline passes it to the step, else from one seeded like the global RNG. ``num``: images
    (default: one per prompt). Returns (images [num, C, H, W] in [0, 1], their prompts / labels)."""
    from distill.denoiser import Denoiser
    from distill.runs import STUDENT, load_run
    from distill.sampling import draw
    from distill.students import FewStepSampler, load_student
    from distill.teachers import load_teacher

    run = load_run(run_dir)
    config = run.config
    teacher = load_teacher(config.teacher.path, config.teacher.revision, image_size=config.data.resolution)
    G = Denoiser(teacher, load_student(teacher.denoiser, run.checkpoint / STUDENT))
    sampler = FewStepSampler(config.student.timesteps, teacher.schedule, teacher.step_noise)

    def sample(noise, cond, generator):
        step_generator = generator if teacher.step_uses_generator else torch.Generator().manual_seed(seed)
        return sampler.sample(lambda x_t, t: G.x0(x_t, t, cond), noise, step_generator)

    num = num or len(prompts)
    return draw(teacher, sample, num, seed, num, "cpu", prompts)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (tiny models, where threads add overhead)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide state (mixed precision, ...); each in-process run
    of the trainer starts from a clean one, as a new `accelerate launch` would."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
