"""Adapters for diffusers Stable Diffusion checkpoints: SD 1.x / 2.x (``StableDiffusionPipeline``
layout, epsilon or v-prediction) and SDXL (``StableDiffusionXLPipeline``: two text encoders,
pooled text embeddings and size / crop time ids).

Latent models (Rombach et al. 2022): x0 is the VAE latent, scaled to unit variance by the VAE
config's ``scaling_factor``; ``sample_shape`` is the latent shape. Prompts are encoded exactly as
the stock pipelines' ``encode_prompt`` encodes them, so the teacher under a diffusers scheduler
reproduces the pipeline's own samples:

* SD: the text encoder's last hidden state [B, L, D] (``encoder_hidden_states``) and its pooled
  output [B, D] (``pooled``, read only by GAN heads; the UNet does not take it).
* SDXL: both encoders' penultimate hidden states, concatenated [B, L, D1 + D2]; the second
  encoder's projected pooled embedding [B, D'] (``text_embeds``); ``time_ids`` [B, 6] =
  (original size, crop top-left, target size) = (H, W, 0, 0, H, W) at the default image size
  (Podell et al. 2023, sec. 2.2).

The null (negative) conditioning for classifier-free guidance is the encoded empty prompt, or
zeros where the pipeline config sets ``force_zeros_for_empty_prompt`` (SDXL base), as the
pipelines do with no negative prompt. Every component is frozen.
"""

from __future__ import annotations

import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from torch import Tensor, nn

from distill.schedules import schedule_from_config
from distill.teachers.base import UNET_LORA_TARGETS, TeacherBase, cached_condition, component_class, present


def _transformers_class(index: dict, name: str) -> type:
    """The transformers class that model_index.json names for component ``name``."""
    library, class_name = index[name]
    if library != "transformers" or not hasattr(transformers, class_name):
        raise ValueError(f"component {name!r} is {library}.{class_name}; expected a transformers class")
    return getattr(transformers, class_name)


def _size2(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent, as the pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_side(image_size: int | None, default: int, scale: int, patch: int = 1) -> int:
    """The latent side for ``image_size`` pixels (None: the checkpoint's ``default``), which
    must be a multiple of the VAE factor times the patch size."""
    if image_size is None:
        return default
    if image_size % (scale * patch):
        raise ValueError(f"image size {image_size} is not a multiple of the VAE's downsampling factor {scale}"
                         + (f" times the patch size {patch}" if patch > 1 else ""))
    return image_size // scale


def load_vae(path: str, revision: str | None, dtype: torch.dtype) -> AutoencoderKL:
    """A pipeline's VAE in ``dtype``, except float32 where its config says ``force_upcast``
    (SDXL's VAE overflows in float16; the pipelines upcast it to decode)."""
    config = AutoencoderKL.load_config(path, subfolder="vae", revision=revision)
    vae_dtype = torch.float32 if dtype == torch.float16 and config.get("force_upcast") else dtype
    return AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype, revision=revision, use_safetensors=True)


class StableDiffusionTeacher(TeacherBase):
    """SD 1.x / 2.x: one CLIP text encoder; conditioning ``{"encoder_hidden_states": [B, L, D],
    "pooled": [B, D]}``."""

    family = "Stable Diffusion 1.x / 2.x (UNet2DConditionModel, AutoencoderKL vae, CLIP text_encoder)"
    component, kohya_prefix, lora_target_modules = "unet", "lora_unet", UNET_LORA_TARGETS
    text_components = (("tokenizer", "text_encoder"),)  # (tokenizer, encoder) component names, in order
    pooled_key = "pooled"  # the conditioning entry GAN heads read (head_condition)
    guidance, null_first = "cfg", True  # the pipelines batch (negative, prompt)

    @classmethod
    def reads(cls, index: dict) -> bool:
        """A text-to-image UNet over a VAE with exactly this class's text encoders (SDXL's refiner,
        text_encoder_2 only, is neither SD nor SDXL)."""
        encoders = [encoder for _, encoder in cls.text_components]
        return (component_class(index, "unet") == "UNet2DConditionModel" and present(index, "vae")
                and all(present(index, encoder) for encoder in encoders)
                and not present(index, f"text_encoder_{len(encoders) + 1}"))

    def pipeline_kwargs(self) -> dict:
        return {"guidance_scale": 0.0}  # classifier-free guidance off

    def __init__(self, *, unet: UNet2DConditionModel, vae: AutoencoderKL, tokenizers: list, text_encoders: list[nn.Module],
                 scheduler_config: dict, force_zeros_for_empty_prompt: bool = False, image_size: int | None = None):
        if unet.config.in_channels != vae.config.latent_channels:
            # inpainting, depth and upscaler UNets take extra input channels that this adapter cannot supply
            raise ValueError(f"the UNet takes {unet.config.in_channels} input channels but the VAE's latents have "
                             f"{vae.config.latent_channels}: only text-to-image checkpoints are supported")
        self.denoiser = unet.requires_grad_(False).eval()
        self.vae = vae.requires_grad_(False).eval()
        self.tokenizers = list(tokenizers)
        self.text_encoders = [encoder.requires_grad_(False).eval() for encoder in text_encoders]
        self.scheduler_config = dict(scheduler_config)
        self.schedule = schedule_from_config(self.scheduler_config)
        self.prediction_type = self.schedule.prediction_type
        self.num_classes = None
        self.vae_scale_factor = vae_scale_factor(vae)
        default = _size2(unet.config.sample_size)
        if image_size is None:  # the checkpoint's default size, as the pipelines use it
            self.sample_shape = (unet.config.in_channels, *default)
        else:  # e.g. SDXL (1024 native) trained and sampled at 512: latents and SDXL's size time ids follow
            side = latent_side(image_size, default[0], self.vae_scale_factor)
            self.sample_shape = (unet.config.in_channels, side, side)
        self.image_size = (self.sample_shape[1] * self.vae_scale_factor, self.sample_shape[2] * self.vae_scale_factor)
        with torch.no_grad():  # encoded once: every guided step needs it
            self._null = self._encode([""])
        if force_zeros_for_empty_prompt:
            self._null = {k: torch.zeros_like(v) if k in ("encoder_hidden_states", self.pooled_key) else v
                          for k, v in self._null.items()}
        self.head_condition_dim = self._null[self.pooled_key].shape[-1]

    def to(self, device) -> "StableDiffusionTeacher":
        for module in (self.denoiser, self.vae, *self.text_encoders):
            module.to(device)
        self._null = {k: v.to(device) for k, v in self._null.items()}
        return self

    # loading --------------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe, image_size: int | None = None) -> "StableDiffusionTeacher":
        """The adapter over an already loaded pipeline's components (its safety checker unused)."""
        return cls(
            image_size=image_size,
            unet=pipe.unet,
            vae=pipe.vae,
            tokenizers=[getattr(pipe, tokenizer) for tokenizer, _ in cls.text_components],
            text_encoders=[getattr(pipe, encoder) for _, encoder in cls.text_components],
            scheduler_config={**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__},
            force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
        )

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                        image_size: int | None = None) -> "StableDiffusionTeacher":
        """Load the UNet, VAE, tokenizer(s) and text encoder(s) of a pipeline directory or hub id
        in ``dtype`` (safetensors only); the safety checker and feature extractor are not loaded.
        ``image_size``: the side of the images to train and sample at (default: the checkpoint's)."""
        index = DiffusionPipeline.load_config(path, revision=revision)
        load = dict(revision=revision, use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **load)
        vae = load_vae(path, revision, dtype)
        tokenizers = [_transformers_class(index, name).from_pretrained(path, subfolder=name, revision=revision)
                      for name, _ in cls.text_components]
        text_encoders = [_transformers_class(index, name).from_pretrained(path, subfolder=name, dtype=dtype, **load)
                         for _, name in cls.text_components]
        scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler", revision=revision)  # the raw dict
        return cls(unet=unet, vae=vae, tokenizers=tokenizers, text_encoders=text_encoders, scheduler_config=scheduler_config,
                   force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", False)), image_size=image_size)

    # conditioning ---------------------------------------------------------------------------
    @staticmethod
    def _tokens(tokenizer, encoder: nn.Module, prompts: list[str]) -> dict[str, Tensor]:
        """Token ids padded and truncated to the tokenizer's length, as ``encode_prompt`` does
        (with the attention mask only for encoders configured to take one)."""
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        inputs = {"input_ids": tokens.input_ids.to(encoder.device)}
        if getattr(encoder.config, "use_attention_mask", False):
            inputs["attention_mask"] = tokens.attention_mask.to(encoder.device)
        return inputs

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """SD's ``encode_prompt``: the last hidden state [B, L, D]; plus the pooled output [B, D]."""
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        out = encoder(**self._tokens(tokenizer, encoder, prompts))
        return {"encoder_hidden_states": out[0], "pooled": out.pooler_output}

    def condition(self, batch: dict) -> dict[str, Tensor]:
        """The batch's cached conditioning, else its ``"prompt"`` list encoded (on the text
        encoders' device, in their dtype)."""
        cached = cached_condition(batch)
        if cached is not None:
            return cached
        prompts = batch["prompt"]
        with torch.no_grad():
            return self._encode([prompts] if isinstance(prompts, str) else list(prompts))

    def null_condition(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        """The empty-prompt conditioning, expanded to ``cond``'s batch, on its device."""
        reference = cond["encoder_hidden_states"]
        return {k: v.to(reference.device).expand(reference.shape[0], *v.shape[1:]) for k, v in self._null.items()}

    def head_condition(self, cond: dict[str, Tensor]) -> Tensor:
        """The pooled text embedding [B, head_condition_dim], float32 (GAN heads train in float32)."""
        return cond[self.pooled_key].float()

    # data space -----------------------------------------------------------------------------
    def _latent_affine(self, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """(mean, scale) with x0 = (latent - mean) * scale: the per-channel latents_mean / std
        when the VAE config has them (as SDXL's pipeline reads them), else its shift_factor
        (0 when absent) and scaling_factor."""
        config = self.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
            std = torch.tensor(config.latents_std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
            return mean, config.scaling_factor / std
        return getattr(config, "shift_factor", None) or 0.0, config.scaling_factor

    @torch.no_grad()  # real images only: no loss differentiates through the encoder
    def encode_images(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> x0 [B, C, H/f, W/f], float32: the mode (mean) of
        the VAE's posterior, scaled. Runs in the VAE's dtype, on its device."""
        latents = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.mode().float()
        mean, scale = self._latent_affine(latents)
        return (latents - mean) * scale

    def decode(self, x0: Tensor, clamp: bool = True) -> Tensor:
        """x0 [B, C, h, w] -> images [B, 3, h*f, w*f] in [0, 1], float32 (``clamp=False``: the
        VAE's values outside [0, 1] kept). Differentiable (a discriminator on decoded images
        trains the student through it)."""
        x0 = x0.to(self.vae.device, torch.float32)
        mean, scale = self._latent_affine(x0)
        images = self.vae.decode((x0 / scale + mean).to(self.vae.dtype)).sample.float() / 2 + 0.5
        return images.clamp(0, 1) if clamp else images

    # the network ----------------------------------------------------------------------------
    def _unet_kwargs(self, cond: dict[str, Tensor], dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": cond["encoder_hidden_states"].to(dtype)}

    def output(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Raw model output [B, C, H, W], float32, in the checkpoint's prediction type. Inputs
        are cast to the denoiser's dtype (a float16 teacher, a float32 trainable copy)."""
        dtype = next(denoiser.parameters()).dtype
        t = t.expand(x_t.shape[0]) if t.dim() == 1 and t.numel() == 1 else t
        return denoiser(x_t.to(dtype), t, **self._unet_kwargs(cond, dtype)).sample.float()

    def bottleneck(self, denoiser: nn.Module) -> nn.Module:
        return denoiser.mid_block

    def bottleneck_channels(self) -> int:
        return self.denoiser.config.block_out_channels[-1]

    def feature_modules(self, denoiser: nn.Module) -> list[nn.Module]:
        """Modules whose outputs are the denoiser's features for a discriminator (LADD): each
        down block's hidden states (the first of its output tuple), then the bottleneck."""
        return [*denoiser.down_blocks, denoiser.mid_block]

    def feature_channels(self) -> list[int]:
        channels = list(self.denoiser.config.block_out_channels)
        return [*channels, channels[-1]]


class StableDiffusionXLTeacher(StableDiffusionTeacher):
    """SDXL: two CLIP text encoders; conditioning ``{"encoder_hidden_states": [B, L, D1 + D2],
    "text_embeds": [B, D'], "time_ids": [B, 6]}``."""

    family = "SDXL (the same with text_encoder_2)"
    text_components = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    pooled_key = "text_embeds"

    def __init__(self, *, unet: UNet2DConditionModel, **components):
        if unet.config.addition_embed_type != "text_time":
            raise ValueError(f"an SDXL UNet has addition_embed_type 'text_time', got {unet.config.addition_embed_type!r}")
        super().__init__(unet=unet, **components)
        # the check SDXL's _get_add_time_ids makes: six time ids plus the pooled embedding
        expected = unet.add_embedding.linear_1.in_features
        passed = unet.config.addition_time_embed_dim * 6 + self.head_condition_dim
        if expected != passed:
            raise ValueError(f"the UNet's added embedding takes {expected} features; time ids and the pooled text "
                             f"embedding give {passed}")

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """SDXL's ``encode_prompt``: both encoders' penultimate hidden states, concatenated; the
        second encoder's projected pooled embedding; and the default size's time ids."""
        hidden, out = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            out = encoder(**self._tokens(tokenizer, encoder, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].to(self.text_encoders[0].device))
        dtype = self.text_encoders[-1].dtype
        states = torch.cat(hidden, dim=-1).to(dtype)
        height, width = self.image_size
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=states.device)
        return {"encoder_hidden_states": states, "text_embeds": out.text_embeds.to(states.device, dtype),
                "time_ids": time_ids.expand(len(prompts), -1)}

    def _unet_kwargs(self, cond: dict[str, Tensor], dtype: torch.dtype) -> dict:
        added = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
        return {**super()._unet_kwargs(cond, dtype), "added_cond_kwargs": added}
