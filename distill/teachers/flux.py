"""Adapter for diffusers FLUX.1 checkpoints (``FluxPipeline``, Black Forest Labs 2024): a
double- and single-stream MMDiT (``FluxTransformer2DModel``) over 2x2-packed VAE latents,
trained by rectified flow.

* Latents: x0 = (latent - shift_factor) * scaling_factor (the VAE config has both), kept
  unpacked, [C, H, W], in ``sample_shape`` so noise, x0 and the schedule work as for every other
  family. ``output`` packs x_t into the transformer's tokens [B, (H/2)(W/2), 4C] as the pipeline's
  ``_pack_latents`` does (token = row * W/2 + col, channel = c * 4 + dy * 2 + dx), passes
  ``img_ids`` (0, row, col) and ``txt_ids`` zeros, and unpacks the velocity.
* Schedule: ``FlowMatchEulerDiscreteScheduler`` -> ``FlowSchedule``, x_t = (1 - sigma) x0 + sigma eps,
  t = sigma * 1000, velocity v = eps - x0 (prediction type ``"flow"``). The transformer takes
  t / 1000, as the pipeline calls it. FLUX.1-dev's scheduler shifts sigmas by the image size
  (``use_dynamic_shifting``): mu = ``calculate_shift(image_seq_len, ...)`` from the scheduler config,
  sigma -> e^mu sigma / (1 + (e^mu - 1) sigma), which is SD3's static shift with shift = e^mu.
  ``mu`` is that value at this adapter's image size; ``schedule.shift`` is the static shift it
  implies (e^mu; mu for ``time_shift_type="linear"``; the config's ``shift`` without dynamic
  shifting, schnell's 1.0), so training timesteps are drawn as the teacher samples at the
  training resolution. ``set_timesteps(scheduler, N)`` makes the pipeline's call: explicit
  sigmas linspace(1, 1/N, N) and mu.
* Conditioning, exactly ``FluxPipeline.encode_prompt``: ``{"encoder_hidden_states": [B, L, D_t5],
  "pooled_projections": [B, D_clip]}``, T5's last hidden state for ``max_sequence_length`` L tokens
  (512; 256 for checkpoints without a guidance embedding, schnell's length in Black Forest Labs'
  reference code) and CLIP's pooled output. The null conditioning is the encoded empty prompt;
  ``head_condition`` is the pooled projection. Cached ``cond.<key>`` batch entries are read as given.
* Guidance (mixed by ``distill.denoiser.Denoiser``, as for every family). FLUX.1-dev
  (``guidance_embeds``, ``FluxTeacher``, ``guidance = "embedded"``) is guidance-distilled: the
  pipeline embeds ``guidance_scale`` (a [B] tensor) into the transformer and runs no
  classifier-free batch. A conditioning may carry that scale as ``"guidance"`` [B]
  (``with_guidance``); ``output`` uses it, or ``guidance_scale`` (3.5, the pipeline's default:
  the network's own, at which students and fake scores run) when absent. 1 is a weak scale,
  not "off". Checkpoints without the embedding (FLUX.1-schnell, ``FluxSchnellTeacher``,
  ``guidance = "cfg"``) get classifier-free guidance with the empty prompt (what the pipeline
  does with ``true_cfg_scale`` and ``negative_prompt=""``); scale 1 is no guidance, as schnell
  samples. ``pipeline_kwargs()`` is what ``FluxPipeline.__call__`` needs to sample as the
  default ``output`` does (size, embedded scale, T5 length): FluxPipeline's own default size
  is 1024 px whatever the transformer, so the size cannot go into the export's config.
* Sampling like the pipeline: ``pipeline_set_timesteps`` passes explicit sigmas
  linspace(1, 1/N, N) and mu (to schedulers that shift dynamically); the pipeline feeds the
  scheduler raw noise and latents and calls its ``step`` without the generator, so the
  stochastic step of an export re-noises from torch's global RNG, in the packed shape
  [B, (H/2)(W/2), 4C]: ``step_noise`` draws the student's re-noising in that shape and unpacks
  it, so a student sampled with a generator seeded as the global RNG is the export's sample.
* Features for discriminators: the image tokens [B, (H/2)(W/2), D] of a block, double-stream
  (``transformer_blocks``) or single-stream (``single_transformer_blocks``), seen as maps
  [B, D, H/2, W/2]. Both kinds return ``(encoder_hidden_states, hidden_states)`` in diffusers 0.42
  (the single-stream blocks split their joint text + image sequence before returning), so the
  map is the second element, image tokens only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from torch import Tensor, nn

from distill.schedules import FlowSchedule, schedule_from_config
from distill.teachers.base import TeacherBase, component_class
from distill.teachers.stable_diffusion import StableDiffusionTeacher, _transformers_class, latent_side, load_vae, vae_scale_factor
from distill.teachers.tokens import TokenMap, _Handles

TEXT_COMPONENTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))  # CLIP-L, T5
DEFAULT_LATENT_SIDE = 128  # FluxPipeline.default_sample_size: latents of the pipeline's default height / width
DEFAULT_GUIDANCE_SCALE = 3.5  # FluxPipeline's default guidance_scale (embedded)


def pack_latents(latents: Tensor) -> Tensor:
    """[B, C, H, W] -> tokens [B, (H/2)(W/2), 4C]: 2x2 patches in row-major order, each patch's
    channels ordered (c, dy, dx), as ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of ``pack_latents``: tokens [B, (H/2)(W/2), 4C] -> [B, C, H, W] (H, W latent sizes)."""
    b, _, channels = tokens.shape
    return tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(
        b, channels // 4, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> Tensor:
    """Position ids [(H/2)(W/2), 3] of the packed tokens: (0, row, col), as ``_prepare_latent_image_ids``."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class PackedTokenMap(TokenMap):
    """A FLUX block's image tokens [B, (H/2)(W/2), D] seen as a map [B, D, H/2, W/2].

    ``TokenMap`` reads the grid from the latents the denoiser is called with, which FLUX gets
    packed; here it comes from the ``img_ids`` the call passes (its last row is (0, H/2 - 1,
    W/2 - 1); reading it syncs with the device once per hooked forward)."""

    def __init__(self, denoiser: nn.Module, block: nn.Module):
        super().__init__(denoiser, block, patch_size=1, stream=1)  # (text, image) outputs

    def register_forward_hook(self, hook, **kwargs) -> _Handles:
        grid = {}

        def record_grid(module, args, kwargs):
            last = kwargs["img_ids"][-1]
            grid["hw"] = (int(last[1]) + 1, int(last[2]) + 1)

        def call_with_map(module, args, output):
            hook(self, args, self(output[self.stream], *grid["hw"]))

        return _Handles([self.denoiser.register_forward_pre_hook(record_grid, with_kwargs=True),
                         self.block.register_forward_hook(call_with_map, **kwargs)])


class FluxTeacher(TeacherBase):
    """FLUX.1-dev (a guidance embedding): conditioning ``{"encoder_hidden_states": [B, L, D],
    "pooled_projections": [B, D']}``, optionally ``"guidance"`` [B] (the embedded scale).
    ``from_pretrained`` / ``from_pipeline`` return a ``FluxSchnellTeacher`` for checkpoints
    without the embedding."""

    family = "FLUX.1 dev / schnell (FluxPipeline)"
    component = "transformer"
    # attention and feed-forward of both streams, and the single-stream blocks' MLP and output projections
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
    scales_initial_noise = scales_model_input = step_uses_generator = False
    guidance, null_first = "embedded", True  # the scale goes into the network; no classifier-free batch
    pooled_key = "pooled_projections"  # the conditioning entry GAN heads read (head_condition)
    guidance_embeds = True
    default_max_sequence_length = 512  # FluxPipeline's default

    @classmethod
    def reads(cls, index: dict) -> bool:
        return component_class(index, "transformer") == "FluxTransformer2DModel"

    # the VAE side and prompt batches are Stable Diffusion's
    _latent_affine = StableDiffusionTeacher._latent_affine
    encode_images = StableDiffusionTeacher.encode_images
    decode = StableDiffusionTeacher.decode
    condition = StableDiffusionTeacher.condition
    head_condition = StableDiffusionTeacher.head_condition

    def __init__(self, *, transformer: FluxTransformer2DModel, vae: AutoencoderKL, tokenizers: list, text_encoders: list,
                 scheduler_config: dict, image_size: int | None = None, max_sequence_length: int | None = None,
                 guidance_scale: float = DEFAULT_GUIDANCE_SCALE):
        """``tokenizers`` / ``text_encoders``: CLIP-L, T5, in the pipeline's order. ``image_size``:
        the side of the images to train and sample at (default: the pipeline's, 128 latents).
        ``guidance_scale``: the embedded scale of ``output`` when the conditioning carries none."""
        if bool(transformer.config.guidance_embeds) != self.guidance_embeds:
            raise ValueError(f"{type(self).__name__} is for transformers with guidance_embeds={self.guidance_embeds}; "
                             "FluxTeacher.from_pretrained / from_pipeline pick the class from the checkpoint")
        channels = vae.config.latent_channels
        if transformer.config.in_channels != 4 * channels or (transformer.config.out_channels or 4 * channels) != 4 * channels:
            raise ValueError(f"the transformer takes {transformer.config.in_channels} input channels but 2x2-packed "
                             f"latents of the VAE have {4 * channels}: only text-to-image FLUX checkpoints are supported "
                             "(not Fill / Canny / Depth)")
        if len(text_encoders) != 2 or any(e is None for e in text_encoders) or any(t is None for t in tokenizers):
            raise ValueError("FLUX takes a CLIP text encoder (pooled embedding) and a T5 encoder (sequence)")
        self.denoiser = transformer.requires_grad_(False).eval()
        self.vae = vae.requires_grad_(False).eval()
        self.tokenizers = list(tokenizers)
        self.text_encoders = [e.requires_grad_(False).eval() for e in text_encoders]
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.guidance_scale = float(guidance_scale)
        self.num_classes = None
        self.vae_scale_factor = vae_scale_factor(vae)
        side = latent_side(image_size, DEFAULT_LATENT_SIDE, self.vae_scale_factor, 2)  # rotary ids: any even side
        self.sample_shape = (channels, side, side)
        self.image_size = (side * self.vae_scale_factor, side * self.vae_scale_factor)

        self.scheduler_config = dict(scheduler_config)
        if not isinstance(schedule_from_config(self.scheduler_config), FlowSchedule):
            raise ValueError(f"FLUX is a rectified-flow model; its scheduler {self.scheduler_config.get('_class_name')!r} "
                             "is not a flow-matching one")
        config = self.scheduler_config
        self.image_seq_len = (side // 2) ** 2
        self.mu = calculate_shift(self.image_seq_len, config.get("base_image_seq_len", 256),
                                  config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                  config.get("max_shift", 1.15))
        if config.get("use_dynamic_shifting", False):
            shift = math.exp(self.mu) if config.get("time_shift_type", "exponential") == "exponential" else self.mu
        else:
            shift = config.get("shift", 1.0)
        # the resolved shift: training timesteps follow the sigmas the teacher samples at this size
        self.schedule = FlowSchedule(config.get("num_train_timesteps", 1000), shift)
        self.prediction_type = self.schedule.prediction_type
        self.patch_size = 2
        with torch.no_grad():  # encoded once: every guided step needs it
            self._null = self._encode([""])
        self.head_condition_dim = self._null[self.pooled_key].shape[-1]

    def _frozen(self) -> list[nn.Module]:
        return [self.denoiser, self.vae, *self.text_encoders]

    def to(self, device) -> "FluxTeacher":
        for module in self._frozen():
            module.to(device)
        self._null = {k: v.to(device) for k, v in self._null.items()}
        return self

    # loading --------------------------------------------------------------------------------
    @staticmethod
    def _variant(transformer: FluxTransformer2DModel) -> type:
        return FluxTeacher if transformer.config.guidance_embeds else FluxSchnellTeacher

    @classmethod
    def from_pipeline(cls, pipe, image_size: int | None = None) -> "FluxTeacher":
        """The adapter over an already loaded pipeline's components (an image encoder unused)."""
        return cls._variant(pipe.transformer)(
            transformer=pipe.transformer, vae=pipe.vae, image_size=image_size,
            tokenizers=[getattr(pipe, tokenizer, None) for tokenizer, _ in TEXT_COMPONENTS],
            text_encoders=[getattr(pipe, encoder, None) for _, encoder in TEXT_COMPONENTS],
            scheduler_config={**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__})

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                        image_size: int | None = None) -> "FluxTeacher":
        """Load the transformer, VAE, tokenizers and text encoders of a pipeline directory or hub
        id, every frozen part in ``dtype`` (the 4.7B-parameter T5 included; safetensors only).
        ``image_size``: the side of the images to train and sample at (default: 128 latents)."""
        index = DiffusionPipeline.load_config(path, revision=revision)
        load = dict(revision=revision, use_safetensors=True)
        transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype, **load)
        vae = load_vae(path, revision, dtype)
        tokenizers = [_transformers_class(index, name).from_pretrained(path, subfolder=name, revision=revision)
                      for name, _ in TEXT_COMPONENTS]
        text_encoders = [_transformers_class(index, name).from_pretrained(path, subfolder=name, dtype=dtype, **load)
                         for _, name in TEXT_COMPONENTS]
        scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler", revision=revision)
        return cls._variant(transformer)(transformer=transformer, vae=vae, tokenizers=tokenizers,
                                         text_encoders=text_encoders, scheduler_config=scheduler_config, image_size=image_size)

    # sampling like the pipeline -------------------------------------------------------------
    @staticmethod
    def pipeline_set_timesteps(scheduler, num_steps: int, device=None, mu: float | None = None) -> Tensor:
        """Set ``scheduler``'s timesteps for ``num_steps`` as ``FluxPipeline.__call__`` does, and
        return them: explicit sigmas linspace(1, 1/N, N) (none for schedulers with
        ``use_flow_sigmas``) and ``mu`` (an adapter's: its image size's). mu goes only to
        schedulers that shift dynamically: the others ignore it (FlowMatchEuler, e.g. an
        export's) or refuse it (DPM-Solver)."""
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        shift = {"mu": mu} if scheduler.config.get("use_dynamic_shifting") else {}
        timesteps, _ = retrieve_timesteps(scheduler, num_steps, device, sigmas=sigmas, **shift)
        return timesteps

    def step_noise(self, shape, *, generator: torch.Generator | None, dtype: torch.dtype, device) -> Tensor:
        """Noise [B, C, H, W] drawn as FluxPipeline's stochastic ``scheduler.step`` draws it: in the
        packed shape [B, (H/2)(W/2), 4C] (``randn_tensor`` of the model output's), unpacked."""
        b, c, height, width = shape
        tokens = torch.randn((b, (height // 2) * (width // 2), 4 * c), generator=generator, dtype=dtype, device=device)
        return unpack_latents(tokens, height, width)

    def register_sample_size(self, denoiser: nn.Module) -> None:
        """Nothing: FluxPipeline's default size is 128 latents whatever the transformer says;
        ``pipeline_kwargs`` carries the trained size."""

    def pipeline_kwargs(self) -> dict:
        """What to pass to ``FluxPipeline.__call__`` so that it samples as ``output`` does by
        default: this image size (the pipeline's own default is 1024 px whatever the
        transformer), the embedded guidance scale and the T5 length (for the model card of an
        export and for evaluating one)."""
        height, width = self.image_size
        return {"height": height, "width": width, "guidance_scale": self.guidance_scale,
                "max_sequence_length": self.max_sequence_length}

    # conditioning ---------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """``FluxPipeline.encode_prompt``: CLIP's pooled output (``_get_clip_prompt_embeds``, padded
        to the tokenizer's length) and T5's last hidden state for ``max_sequence_length`` tokens
        (``_get_t5_prompt_embeds``); neither with an attention mask."""
        (clip_tokenizer, t5_tokenizer), (clip, t5) = self.tokenizers, self.text_encoders
        ids = clip_tokenizer(prompts, padding="max_length", max_length=clip_tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        pooled = clip(ids.to(clip.device), output_hidden_states=False).pooler_output.to(clip.dtype)
        ids = t5_tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                           return_tensors="pt").input_ids
        states = t5(ids.to(t5.device), output_hidden_states=False)[0].to(pooled.device, t5.dtype)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def null_condition(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        """The empty-prompt conditioning, expanded to ``cond``'s batch, on its device; an embedded
        guidance scale that ``cond`` carries is carried over (true CFG keeps it on both sides)."""
        reference = cond["encoder_hidden_states"]
        null = {k: v.to(reference.device).expand(reference.shape[0], *v.shape[1:]) for k, v in self._null.items()}
        return {**null, "guidance": cond["guidance"]} if "guidance" in cond else null

    def with_guidance(self, cond: dict[str, Tensor], guidance_scale: float) -> dict[str, Tensor]:
        """``cond`` carrying the embedded guidance scale ``guidance_scale`` ([B] float32, as the
        pipeline builds ``guidance``): ``output`` then runs the network at that scale."""
        reference = cond["encoder_hidden_states"]
        scale = torch.full((reference.shape[0],), float(guidance_scale), device=reference.device, dtype=torch.float32)
        return {**cond, "guidance": scale}

    # the network ----------------------------------------------------------------------------
    def _guidance(self, cond: dict[str, Tensor], batch_size: int, device) -> Tensor | None:
        if "guidance" in cond:
            return cond["guidance"].reshape(-1).expand(batch_size)
        return torch.full((batch_size,), self.guidance_scale, device=device, dtype=torch.float32)

    def output(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Velocity v = eps - x0 [B, C, H, W], float32, for x_t [B, C, H, W] (unpacked) and t [B]
        (or one) = sigma * 1000. As the pipeline calls it: packed tokens, timestep t / 1000 (t cast
        to the network's dtype first), the embedded guidance (dev), zero text ids. Inputs are cast
        to the denoiser's dtype (a bfloat16 teacher, a float32 trainable copy)."""
        dtype = next(denoiser.parameters()).dtype
        b, _, height, width = x_t.shape
        t = t.reshape(-1)
        t = t.expand(b) if t.numel() == 1 else t
        states = cond["encoder_hidden_states"].to(dtype)
        out = denoiser(
            hidden_states=pack_latents(x_t.to(dtype)),
            timestep=t.to(x_t.device, dtype) / 1000,
            guidance=self._guidance(cond, b, x_t.device),
            pooled_projections=cond["pooled_projections"].to(dtype),
            encoder_hidden_states=states,
            txt_ids=torch.zeros(states.shape[1], 3, device=x_t.device, dtype=dtype),
            img_ids=latent_image_ids(height, width, x_t.device, dtype),
        ).sample
        return unpack_latents(out.float(), height, width)

    # features -------------------------------------------------------------------------------
    @staticmethod
    def _blocks(denoiser: nn.Module) -> list[nn.Module]:
        """Every block in forward order: the double-stream blocks, then the single-stream ones."""
        return [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks]

    def _feature_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        """Up to four evenly spaced blocks, the last one included (for FLUX.1's 19 + 38: blocks
        13, 28, 42 and 56 in forward order)."""
        blocks = self._blocks(denoiser)
        count = min(4, len(blocks))
        return [blocks[round((i + 1) * len(blocks) / count) - 1] for i in range(count)]

    def bottleneck(self, denoiser: nn.Module) -> PackedTokenMap:
        """The middle block's image tokens as a map [B, D, H/2, W/2] (for FLUX.1, single-stream
        block 9 of 38, block 28 of 57): a transformer has no bottleneck; its middle is as far
        from the input and the output as it gets."""
        blocks = self._blocks(denoiser)
        return PackedTokenMap(denoiser, blocks[(len(blocks) - 1) // 2])

    def bottleneck_channels(self) -> int:
        return self.denoiser.inner_dim

    def feature_modules(self, denoiser: nn.Module) -> list[PackedTokenMap]:
        """Image tokens of up to four evenly spaced blocks as maps [B, D, H/2, W/2] (outputs of the
        views' hooks; ``denoiser_features`` hooks them like any module)."""
        return [PackedTokenMap(denoiser, block) for block in self._feature_blocks(denoiser)]

    def feature_channels(self) -> list[int]:
        return [self.denoiser.inner_dim] * len(self._feature_blocks(self.denoiser))


class FluxSchnellTeacher(FluxTeacher):
    """FLUX.1-schnell and any FLUX checkpoint without a guidance embedding: the transformer gets
    ``guidance=None``; guidance, where asked for, is classifier-free with the empty prompt."""

    guidance = "cfg"  # the Denoiser mixes a null-prompt output (scale 1: none); FluxPipeline runs two calls
    guidance_embeds = False
    default_max_sequence_length = 256  # schnell's T5 length in Black Forest Labs' reference sampler

    def pipeline_kwargs(self) -> dict:
        """``FluxTeacher.pipeline_kwargs`` without a guidance scale (the pipeline ignores it here)."""
        kwargs = super().pipeline_kwargs()
        del kwargs["guidance_scale"]
        return kwargs

    def with_guidance(self, cond: dict[str, Tensor], guidance_scale: float) -> dict[str, Tensor]:
        raise ValueError(f"{type(self).__name__}: this checkpoint has no guidance embedding (guidance 'cfg'): "
                         "guidance is classifier-free, mixed from a null-prompt output")

    def _guidance(self, cond: dict[str, Tensor], batch_size: int, device) -> None:
        if "guidance" in cond:
            raise ValueError("this checkpoint has no guidance embedding, but the conditioning carries a 'guidance' scale")
        return None
