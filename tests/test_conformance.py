"""The conformance kit: what every teacher adapter passes, one entry per family.

Each entry is a tiny pipeline of the family (built in-process after a seed, saved, loaded
through the real loaders), the adapter class ``load_teacher`` must return for it, a shipped
recipe of the family, and how its stock pipeline is called with guidance. For every entry:

- the registry picks the adapter (its pipeline class, and exactly one adapter reads its
  components), and the adapter's family facts fit the pipeline;
- x0 equals what the stock scheduler's step implies (DDIM's ``pred_original_sample``; for flow
  matching, the Euler step to sigma = 0);
- ``sample_teacher`` under the checkpoint's own scheduler reproduces the stock pipeline within
  1e-4, unguided (the pipeline called with the adapter's ``pipeline_kwargs``, what the model
  card prints) and guided;
- features hook real modules: perturbing a feature module's output changes its feature by
  the perturbation and changes the network's output;
- the recipe, with two student timesteps and a LoRA student, trains 2 steps through
  ``distill.train.main`` and exports; stock diffusers samples the export as the student samples
  (within 1e-4, re-noising included: the student's noise drawn as the pipeline's step draws
  it, the global RNG seeded where the pipeline uses it), and the diffusers LoRA loads with
  ``load_lora_weights`` on the teacher's pipeline and samples like the fused export.

Adding a family is adding one ``Family`` entry to ``FAMILIES``.
"""

from __future__ import annotations

import copy
import inspect
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from conftest import (REPO, TEXT_PROMPTS, build_tiny_sd, build_tiny_sdxl, build_tiny_teacher, latent_recipe_overrides,
                      student_images_as_the_pipeline_draws, tiny_overrides)
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file
from test_sd3 import build_tiny_sd3, build_tiny_sd3_without_t5
from test_transformer_teachers import build_tiny_dit, build_tiny_pixart
from tiny_flux import build_tiny_flux

from distill import train
from distill.denoiser import Denoiser
from distill.discriminators.backbones import can_stop_early, capture, denoiser_features
from distill.export import KOHYA_DIR, KOHYA_FILE, LORA_DIR, export
from distill.runs import CONFIG
from distill.sampling import balanced_labels, draw, sample_teacher
from distill.schedules import FlowSchedule
from distill.teachers import (ADAPTERS, PIPELINES, DiTTeacher, FluxTeacher, PixArtTeacher, PixelUNetTeacher,
                              StableDiffusion3Teacher, StableDiffusionTeacher, StableDiffusionXLTeacher, adapter_class,
                              load_pipeline, load_teacher, read_index, teacher_from_pipeline)
from distill.teachers.flux import FluxSchnellTeacher


def _recipe(name: str) -> str:
    return str(REPO / "recipes" / f"{name}.yaml")


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[Path], Path]  # saves the tiny pipeline at the path given, returns it
    adapter: type  # the class load_teacher returns for it
    recipe: str  # a shipped recipe of the family
    guidance_scale: float = 3.0  # the guided sampling test's scale
    guided_call: Callable[[float], dict] = field(default=lambda scale: {"guidance_scale": scale})  # its pipeline kwargs
    image_size: int | None = None  # train and sample at this side (None: the checkpoint's)


FAMILIES = [
    Family("pixel-unet", build_tiny_teacher, PixelUNetTeacher, _recipe("digits-dmd2-1step")),
    Family("sd1-eps", build_tiny_sd, StableDiffusionTeacher, _recipe("sd15-dmd2-4step-lora")),
    Family("sd2-v", partial(build_tiny_sd, prediction_type="v_prediction"), StableDiffusionTeacher,
           _recipe("sd21-vpred-dmd2-4step")),
    Family("sdxl", build_tiny_sdxl, StableDiffusionXLTeacher, _recipe("sdxl-dmd2-4step-lora")),
    Family("dit", build_tiny_dit, DiTTeacher, _recipe("dit256-dmd2-1step")),
    Family("pixart", build_tiny_pixart, PixArtTeacher, _recipe("pixart-dmd2-4step")),
    Family("sd3", build_tiny_sd3, StableDiffusion3Teacher, _recipe("sd3-dmd2-4step-lora")),
    Family("sd3-without-t5", build_tiny_sd3_without_t5, StableDiffusion3Teacher, _recipe("sd3-dmd2-4step-lora")),
    Family("flux-dev", build_tiny_flux, FluxTeacher, _recipe("flux-dmd2-4step-lora"), guidance_scale=2.0, image_size=16),
    Family("flux-schnell", partial(build_tiny_flux, guidance_embeds=False), FluxSchnellTeacher,
           _recipe("flux-dmd2-4step-lora"), guidance_scale=2.5,
           guided_call=lambda scale: {"true_cfg_scale": scale, "negative_prompt": ""}, image_size=16),
]
NUM, SEED, STEPS = 2, 3, 2

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """Each family's tiny pipeline, built on first use."""
    root, built = tmp_path_factory.mktemp("families"), {}

    class Paths(dict):
        def __missing__(self, name):
            family = next(f for f in FAMILIES if f.name == name)
            built[name] = family.build(root / name)
            return built[name]

    return Paths()


@pytest.fixture(scope="module")
def teachers(paths):
    cache = {}

    def teacher(family: Family):
        if family.name not in cache:
            cache[family.name] = load_teacher(str(paths[family.name]), image_size=family.image_size)
        return cache[family.name]

    return teacher


def _inputs(teacher, num: int = NUM):
    """What a draw of ``num`` is conditioned on: prompts for text teachers, balanced labels (or None)."""
    return list(TEXT_PROMPTS[:num]) if teacher.head_condition_dim and teacher.num_classes is None else None


def _condition(teacher, num: int = NUM) -> dict:
    prompts = _inputs(teacher, num)
    if prompts is not None:
        return teacher.condition({"prompt": prompts})
    labels = balanced_labels(num, teacher.num_classes)
    return teacher.condition({"class_label": labels}) if labels is not None else {}


def _randn(teacher, num: int = NUM, seed: int = 1):
    return torch.randn((num, *teacher.sample_shape), generator=torch.Generator().manual_seed(seed))


def stock_images(pipe, teacher, prompts, num: int, steps: int, seed: int, kwargs: dict) -> torch.Tensor:
    """Images [num, 3, H, W] in [0, 1] from stock diffusers, as the model card says to sample:
    the pipeline's call for prompts or class labels, else the card's loop over its denoiser
    and scheduler (a class-conditional pixel UNet, which DDPMPipeline cannot condition; a
    ``guidance_scale`` there is classifier-free guidance with the checkpoint's null class, the
    last label embedding). The call gets a generator seeded ``seed``, torch's global RNG is
    seeded too (pipelines whose scheduler.step gets no generator draw from it)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    call = inspect.signature(type(pipe).__call__).parameters
    with torch.no_grad():
        if "prompt" in call:
            return pipe(prompts, num_inference_steps=steps, generator=generator, output_type="pt", **kwargs).images
        labels = balanced_labels(num, teacher.num_classes)
        if "class_labels" in call:
            return pipe(class_labels=labels.tolist(), num_inference_steps=steps, generator=generator, output_type="pt",
                        **kwargs).images
        model, scheduler = getattr(pipe, teacher.component), pipe.scheduler
        x = torch.randn((num, model.config.in_channels, model.config.sample_size, model.config.sample_size),
                        generator=generator)
        scheduler.set_timesteps(steps)
        scale = kwargs.get("guidance_scale", 1.0)
        for t in scheduler.timesteps:
            output = model(x, t, class_labels=labels).sample
            if scale != 1.0:
                null = model(x, t, class_labels=torch.full_like(labels, model.config.num_class_embeds - 1)).sample
                output = null + scale * (output - null)
            x = scheduler.step(output, t, x, generator=generator).prev_sample
        return (x / 2 + 0.5).clamp(0, 1)


# --- the registry and the family facts -----------------------------------------------------------------


def test_the_registry_picks_the_adapter_and_its_facts_fit_the_pipeline(family, paths, teachers):
    path = paths[family.name]
    index = read_index(str(path))
    cls = adapter_class(index, str(path))
    assert PIPELINES[index["_class_name"]] is cls
    assert [adapter for adapter in ADAPTERS if adapter.reads(index)] == [cls]  # the component fallback agrees, alone
    teacher = teachers(family)
    assert type(teacher) is family.adapter and isinstance(teacher, cls)
    pipe = load_pipeline(str(path))  # absent components passed as None, as the adapter says
    assert type(pipe.components[teacher.component]) is type(teacher.denoiser)
    assert _targeted(teacher, cls.lora_target_modules), "no default LoRA target names a module of the denoiser"
    assert (teacher.kohya_prefix is None) or teacher.kohya_prefix.startswith("lora_")
    # the pipeline's own first timestep is the last legal one a student may start at, or below it
    scheduler = type(pipe.scheduler).from_config(teacher.scheduler_config)
    first = float(teacher.set_timesteps(scheduler, 4).max())
    assert teacher.schedule.last_timestep - 300 < first <= teacher.schedule.last_timestep + 1e-3


def _targeted(teacher, targets) -> list[str]:
    """The LoRA targets (peft suffixes) that name modules of the teacher's denoiser."""
    names = [name for name, _ in teacher.denoiser.named_modules()]
    return [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]


# --- x0, sampling, features ----------------------------------------------------------------------------


@torch.no_grad()
def test_x0_is_what_the_stock_scheduler_step_implies(family, teachers):
    teacher = teachers(family)
    cond, x_t = _condition(teacher, 1), _randn(teacher, 1)
    x0_of = Denoiser(teacher, teacher.denoiser)
    if isinstance(teacher.schedule, FlowSchedule):
        own = FlowMatchEulerDiscreteScheduler.from_config(teacher.scheduler_config)
        teacher.set_timesteps(own, 4)  # the teacher's own (shifted, non-integer) timesteps
        for sigma in own.sigmas[:-1].tolist():
            to_zero = FlowMatchEulerDiscreteScheduler.from_config(
                {**teacher.scheduler_config, "shift": 1.0, "use_dynamic_shifting": False})
            to_zero.set_timesteps(sigmas=[sigma])  # sigma, then 0: one Euler step to x0
            t = to_zero.timesteps[:1]
            expected = to_zero.step(teacher.output(teacher.denoiser, x_t, t, cond), t[0], x_t).prev_sample
            x0 = x0_of.x0(x_t, t, cond)
            assert (x0 - x_t).abs().max() > 1e-3
            torch.testing.assert_close(x0, expected, atol=1e-5, rtol=1e-5)
        return
    ddim = DDIMScheduler.from_config(teacher.scheduler_config, clip_sample=False, thresholding=False)
    ddim.set_timesteps(10)
    for t in (1, 250, 600, 999):
        t = torch.tensor([t])
        expected = ddim.step(teacher.output(teacher.denoiser, x_t, t, cond), int(t), x_t).pred_original_sample
        # the conversion divides by alpha_t (0.006 at t = 999 on a linear schedule): compare alpha_t * x0
        alpha, _ = teacher.schedule.alpha_sigma(t)
        torch.testing.assert_close(alpha * x0_of.x0(x_t, t, cond), alpha * expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "guided"])
def test_sample_teacher_reproduces_the_stock_pipeline(family, guided, paths, teachers):
    """Unguided: ``guidance_scale`` None (the network's own) against the pipeline called with
    the adapter's ``pipeline_kwargs``; guided: the family's scale both ways."""
    teacher = teachers(family)
    pipe = load_pipeline(str(paths[family.name]))
    pipe.set_progress_bar_config(disable=True)
    scale = family.guidance_scale if guided else None
    sample = partial(sample_teacher, teacher, type(pipe.scheduler), STEPS, guidance_scale=scale)
    ours, _ = draw(teacher, lambda noise, cond, generator: sample(noise, cond, generator=generator), NUM, SEED, NUM,
                   "cpu", _inputs(teacher))
    kwargs = {**teacher.pipeline_kwargs(), **(family.guided_call(scale) if guided else {})}
    theirs = stock_images(pipe, teacher, _inputs(teacher), NUM, STEPS, SEED, kwargs)
    assert ours.std() > 1e-3
    torch.testing.assert_close(ours, theirs.float(), atol=1e-4, rtol=0)
    if guided:  # the scale matters, so the test can fail
        unguided = stock_images(pipe, teacher, _inputs(teacher), NUM, STEPS, SEED, teacher.pipeline_kwargs())
        assert (unguided - theirs).abs().max() > 1e-3


@torch.no_grad()
def test_features_hook_real_modules(family, teachers):
    teacher = teachers(family)
    cond, x_t, t = _condition(teacher), _randn(teacher), torch.tensor([300, 800])
    output, features = denoiser_features(teacher, teacher.denoiser, x_t, t, cond)
    torch.testing.assert_close(output, teacher.output(teacher.denoiser, x_t, t, cond), atol=0, rtol=0)
    assert [f.shape[1] for f in features] == teacher.feature_channels() and all(f.dim() == 4 for f in features)
    captured = []
    hook = teacher.bottleneck(teacher.denoiser).register_forward_hook(lambda m, a, out: captured.append(out))
    teacher.output(teacher.denoiser, x_t, t, cond)
    hook.remove()
    assert captured[0].dim() == 4 and captured[0].shape[1] == teacher.bottleneck_channels()

    for i, view in enumerate(teacher.feature_modules(teacher.denoiser)):
        module, stream = getattr(view, "block", view), getattr(view, "stream", 0)  # token-map views hook their block
        delta = {}

        def perturb(m, args, out):
            tensor = out[stream] if isinstance(out, tuple) else out
            delta["d"] = 0.5 * torch.randn(tensor.shape, generator=torch.Generator().manual_seed(i))
            if not isinstance(out, tuple):
                return tensor + delta["d"]
            return tuple(tensor + delta["d"] if j == stream else o for j, o in enumerate(out))

        handle = module.register_forward_hook(perturb)
        changed_output, (changed,) = denoiser_features(teacher, teacher.denoiser, x_t, t, cond, layers=[i])
        handle.remove()
        # the feature is that module's output (a map of it), so it moves by exactly the perturbation
        torch.testing.assert_close((changed - features[i]).norm(), delta["d"].norm(), rtol=1e-4, atol=1e-4)
        assert (changed_output - output).abs().max() > 1e-6, f"feature module {i} is not on the network's path"


def test_a_forward_stopped_at_the_last_feature_module_gives_the_same_features_and_gradients(family, teachers):
    """denoiser_features(output=False) and a critic's heads: the forward ends once the last
    wanted module has run. The features, and the gradients through them to the input and the
    weights, equal the whole forward's; the modules after it (a UNet's decoder, a transformer's
    later blocks and output layers) do not run; the bottleneck stops the same way."""
    teacher = teachers(family)
    network = copy.deepcopy(teacher.denoiser).requires_grad_(True)
    cond, t = _condition(teacher), torch.tensor([300, 800])
    ran = []
    counters = [m.register_forward_hook(lambda m, a, out: ran.append(m)) for m in network.modules() if not list(m.children())]

    def features(stop: bool, modules: list):
        ran.clear()
        x_t = _randn(teacher).requires_grad_(True)
        output, maps = capture(modules, lambda: teacher.output(network, x_t, t, cond), stop=stop)
        network.zero_grad(set_to_none=True)
        sum((m.float() * torch.linspace(-1, 1, m.numel()).view(m.shape)).sum() for m in maps).backward()
        grads = {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}
        return output, maps, x_t.grad, grads, len(ran)

    assert can_stop_early(network)
    for modules in (teacher.feature_modules(network), [teacher.bottleneck(network)]):
        full_out, full, full_dx, full_grads, full_ran = features(False, modules)
        out, stopped, dx, grads, stopped_ran = features(True, modules)
        assert full_out is not None and out is None
        for a, b in zip(stopped, full, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(dx, full_dx, atol=1e-6, rtol=1e-4)
        assert grads.keys() == full_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], full_grads[name], atol=1e-6, rtol=1e-4, msg=name)
        assert stopped_ran < full_ran, (stopped_ran, full_ran)
    for counter in counters:
        counter.remove()
    _, maps = denoiser_features(teacher, network, _randn(teacher), t, cond, output=False)
    assert [m.shape[1] for m in maps] == teacher.feature_channels()


# --- a recipe trains, exports, and stock diffusers samples the student ------------------------------------


@pytest.fixture(scope="module")
def trained(paths, teachers, text_data, tmp_path_factory):
    """family -> (run, export): the family's recipe with two student timesteps, a LoRA student
    (and a LoRA fake score for DMD2), 2 training steps, then ``distill export``. The student's
    learning rate is large enough (1e-2) that 2 steps move its LoRA visibly: the samples of the
    export, the student and the teacher with the LoRA then differ from the teacher's."""
    root, done = tmp_path_factory.mktemp("conformance-runs"), {}

    def run(family: Family):
        if family.name in done:
            return done[family.name]
        teacher_path, out = paths[family.name], root / family.name
        raw = yaml.safe_load(open(family.recipe))
        schedule = teachers(family).schedule
        last = schedule.last_timestep
        extra = {"student.timesteps": f"[{last},{last - schedule.num_train_timesteps // 2}]",
                 "student.lora.rank": 4, "student.lora.alpha": 2, "optim.student.lr": 1e-2, "train.ema_decay": 0,
                 "method.gan.discriminator.head_width": 8}
        if raw["method"]["name"] == "dmd2":
            extra["method.fake_score_lora.rank"] = 4
        if raw.get("data", {}).get("dataset", "digits") == "digits":
            overrides = tiny_overrides(teacher_path, None, out / "run", **extra)
        else:
            overrides = latent_recipe_overrides(family.recipe, teacher_path, text_data, out / "run", **extra)
        train.main([family.recipe, *overrides])
        done[family.name] = out / "run", export(out / "run", out / "export")
        return done[family.name]

    return run


def test_a_two_step_recipe_trains_exports_and_stock_diffusers_samples_the_student(family, trained, teachers):
    run, out = trained(family)
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(row["generator/generator_loss"])) for row in rows)
    config = yaml.safe_load((run / CONFIG).read_text())
    raw = yaml.safe_load(open(family.recipe))
    targets = config["student"]["lora"]["target_modules"]  # left null: the adapter's, written into config.yaml
    assert targets == raw["student"].get("lora", {}).get("target_modules", list(family.adapter.lora_target_modules))
    student_dir = sorted((run / "checkpoints").glob("step-*"))[-1] / "student"
    assert (student_dir / "adapter_config.json").is_file() and not (student_dir / "config.json").exists()  # a LoRA only
    adapter = load_file(student_dir / "adapter_model.safetensors")
    lora_b = [k for k in adapter if "lora_B" in k]
    targeted = _targeted(teachers(family), targets)
    assert targeted and all(any(f".{t}.lora_B" in k for k in lora_b) for t in targeted)  # every target got a LoRA
    assert any(adapter[k].abs().max() > 0 for k in lora_b)  # B starts at 0: the adapter trained

    pipe = load_pipeline(str(out))
    pipe.set_progress_bar_config(disable=True)
    exported = teacher_from_pipeline(pipe, image_size=config["data"]["resolution"])
    assert type(exported) is family.adapter
    steps = len(config["student"]["timesteps"])
    assert exported.set_timesteps(pipe.scheduler, steps).tolist() == pytest.approx(config["student"]["timesteps"], abs=1e-3)
    prompts = _inputs(exported)
    theirs = stock_images(pipe, exported, prompts, NUM, steps, SEED, exported.pipeline_kwargs())
    ours, _ = student_images_as_the_pipeline_draws(run, prompts, SEED, NUM)
    assert ours.std() > 1e-3
    torch.testing.assert_close(theirs.float(), ours, atol=1e-4, rtol=0)
    card = (out / "README.md").read_text()
    call = ", ".join([f"num_inference_steps={steps}", *(f"{k}={v!r}" for k, v in exported.pipeline_kwargs().items())])
    assert call in card or "scheduler.step(output" in card  # the call (or the loop) that was just run
    if exported.guidance == "embedded":  # 0 would be an embedded scale, not "no guidance"
        assert "guidance_scale=0.0" not in card


def test_the_lora_export_loads_on_the_teacher_and_samples_like_the_fused_export(family, trained, paths):
    run, out = trained(family)
    fused = load_pipeline(str(out))
    if not hasattr(type(fused), "load_lora_weights"):  # no diffusers LoRA loader: the export says so
        assert not (out / LORA_DIR).exists()
        with pytest.raises(ValueError, match="no diffusers LoRA loader"):
            export(run, out.with_name("lora-export"), formats=["lora"])
        return
    config = yaml.safe_load((run / CONFIG).read_text())
    fused.set_progress_bar_config(disable=True)
    exported = teacher_from_pipeline(fused, image_size=config["data"]["resolution"])
    pipe = load_pipeline(config["teacher"]["path"])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = type(fused.scheduler).from_pretrained(out, subfolder="scheduler")
    steps, prompts = len(config["student"]["timesteps"]), _inputs(exported)
    plain = stock_images(pipe, exported, prompts, NUM, steps, SEED, exported.pipeline_kwargs())
    pipe.load_lora_weights(out / LORA_DIR)
    with_lora = stock_images(pipe, exported, prompts, NUM, steps, SEED, exported.pipeline_kwargs())
    expected = stock_images(fused, exported, prompts, NUM, steps, SEED, exported.pipeline_kwargs())
    torch.testing.assert_close(with_lora, expected, atol=1e-4, rtol=0)
    assert (plain - expected).abs().max() > 1e-3  # the LoRA matters

    if exported.kohya_prefix is None:
        assert not (out / KOHYA_DIR).exists()
        return
    kohya = load_file(out / KOHYA_DIR / KOHYA_FILE)  # kohya / ComfyUI names, each pair with its alpha
    downs = [k for k in kohya if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith(f"{exported.kohya_prefix}_") for k in kohya) and len(kohya) == 3 * len(downs)
    assert all(k.replace(".lora_down.weight", ".lora_up.weight") in kohya and
               float(kohya[k.replace(".lora_down.weight", ".alpha")]) == 2.0 for k in downs)
