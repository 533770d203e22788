"""Adapter for diffusers Stable Diffusion 3 / 3.5 checkpoints (``StableDiffusion3Pipeline``, Esser
et al. 2024): an MMDiT (``SD3Transformer2DModel``) over VAE latents, trained by rectified flow.

* Schedule: ``FlowMatchEulerDiscreteScheduler`` -> ``FlowSchedule``; x_t = (1 - sigma) x0 + sigma eps
  with sigma = t / 1000, and the transformer predicts the velocity v = eps - x0 (prediction type
  ``"flow"``). It is called with the float timestep t = sigma * 1000, as the pipeline calls it.
* Latents: x0 = (latent - shift_factor) * scaling_factor (SD3's VAE config has both);
  ``encode_images`` / ``decode`` are the SD adapter's, which read both.
* Conditioning, exactly the pipeline's ``encode_prompt`` (no clip_skip, max_sequence_length 256):
  ``{"encoder_hidden_states": [B, L_clip + L_t5, D_t5], "pooled_projections": [B, P1 + P2]}``: the
  two CLIP encoders' penultimate hidden states concatenated along the features, zero-padded to
  T5's width and concatenated along the sequence with T5's last hidden state; the two projected
  pooled CLIP embeddings side by side. Without T5 (``text_encoder_3`` saved as null, as the
  pipeline allows) its part is zeros [B, 256, joint_attention_dim], as the pipeline makes it.
  The null conditioning is the encoded empty prompt (the pipeline's default negative prompt);
  ``head_condition`` is the pooled projection.
* Features for discriminators: a transformer block's image tokens [B, h * w, D] (h, w: latent
  size over the patch size; D = ``inner_dim``) seen as maps [B, D, h, w] by ``TokenMap`` (the image stream of the joint blocks).
  SD3's blocks return ``(encoder_hidden_states, hidden_states)``: the map is the second, the
  image stream (the first is the text stream, None after the last block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor, nn

from distill.schedules import FlowSchedule, schedule_from_config
from distill.teachers.base import TeacherBase, component_class, present
from distill.teachers.stable_diffusion import (StableDiffusionTeacher, _transformers_class, latent_side, load_vae,
                                               vae_scale_factor)
from distill.teachers.tokens import TokenMap

TEXT_COMPONENTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"), ("tokenizer_3", "text_encoder_3"))
MAX_SEQUENCE_LENGTH = 256  # the pipeline's default T5 prompt length


class StableDiffusion3Teacher(TeacherBase):
    """SD3 / SD3.5: conditioning ``{"encoder_hidden_states": [B, L, D], "pooled_projections": [B, D']}``."""

    family = "SD3 / 3.5 (StableDiffusion3Pipeline; text_encoder_3, T5, may be saved as null)"
    component = "transformer"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")  # both streams
    # the pipeline feeds FlowMatchEuler the raw noise and latents and calls its step without the generator
    scales_initial_noise = scales_model_input = step_uses_generator = False
    pooled_key = "pooled_projections"  # the conditioning entry GAN heads read (head_condition)

    # the VAE side and the null conditioning are Stable Diffusion's
    _latent_affine = StableDiffusionTeacher._latent_affine
    encode_images = StableDiffusionTeacher.encode_images
    decode = StableDiffusionTeacher.decode
    condition = StableDiffusionTeacher.condition
    null_condition = StableDiffusionTeacher.null_condition
    head_condition = StableDiffusionTeacher.head_condition
    guidance, null_first = "cfg", True  # the pipeline batches (negative, prompt)

    @classmethod
    def reads(cls, index: dict) -> bool:
        return (component_class(index, "transformer") == "SD3Transformer2DModel" and present(index, "vae")
                and present(index, "text_encoder") and present(index, "text_encoder_2"))

    def pipeline_kwargs(self) -> dict:
        return {"guidance_scale": 0.0}  # classifier-free guidance off (SD3 guides above 1)

    def __init__(self, *, transformer: SD3Transformer2DModel, vae: AutoencoderKL, tokenizers: list, text_encoders: list,
                 scheduler_config: dict, image_size: int | None = None, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        """``tokenizers`` / ``text_encoders``: CLIP-L, CLIP-G, T5, in the pipeline's order; the T5
        pair may be None (dropped)."""
        channels = transformer.config.in_channels
        if channels != vae.config.latent_channels:
            raise ValueError(f"the transformer takes {channels} input channels but the VAE's latents have "
                             f"{vae.config.latent_channels}: only text-to-image checkpoints are supported")
        if len(text_encoders) != 3 or text_encoders[0] is None or text_encoders[1] is None:
            raise ValueError("SD3 takes two CLIP text encoders and an optional T5 (None when dropped)")
        self.denoiser = transformer.requires_grad_(False).eval()
        self.vae = vae.requires_grad_(False).eval()
        self.tokenizers = list(tokenizers)
        self.text_encoders = [None if e is None else e.requires_grad_(False).eval() for e in text_encoders]
        self.max_sequence_length = max_sequence_length
        self.scheduler_config = dict(scheduler_config)
        self.schedule = schedule_from_config(self.scheduler_config)
        if not isinstance(self.schedule, FlowSchedule):
            raise ValueError(f"SD3 is a rectified-flow model; its scheduler {self.scheduler_config.get('_class_name')!r} "
                             "is not a flow-matching one")
        self.prediction_type = self.schedule.prediction_type
        self.num_classes = None
        self.patch_size = transformer.config.patch_size
        self.vae_scale_factor = vae_scale_factor(vae)
        # SD3's positional embedding is cropped from a larger grid: other sizes work
        side = latent_side(image_size, transformer.config.sample_size, self.vae_scale_factor, self.patch_size)
        self.sample_shape = (channels, side, side)
        self.image_size = (side * self.vae_scale_factor, side * self.vae_scale_factor)
        with torch.no_grad():  # encoded once: every guided step needs it
            self._null = self._encode([""])
        self.head_condition_dim = self._null[self.pooled_key].shape[-1]

    def _frozen(self) -> list[nn.Module]:
        return [self.denoiser, self.vae, *(e for e in self.text_encoders if e is not None)]

    def to(self, device) -> "StableDiffusion3Teacher":
        for module in self._frozen():
            module.to(device)
        self._null = {k: v.to(device) for k, v in self._null.items()}
        return self

    # loading --------------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe, image_size: int | None = None) -> "StableDiffusion3Teacher":
        """The adapter over an already loaded pipeline's components (an image encoder unused)."""
        return cls(transformer=pipe.transformer, vae=pipe.vae, image_size=image_size,
                   tokenizers=[getattr(pipe, tokenizer, None) for tokenizer, _ in TEXT_COMPONENTS],
                   text_encoders=[getattr(pipe, encoder, None) for _, encoder in TEXT_COMPONENTS],
                   scheduler_config={**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__})

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                        image_size: int | None = None) -> "StableDiffusion3Teacher":
        """Load the transformer, VAE, tokenizers and text encoders (T5 where the checkpoint has it)
        of a pipeline directory or hub id in ``dtype`` (safetensors only). ``image_size``: the
        side of the images to train and sample at (default: the checkpoint's)."""
        index = DiffusionPipeline.load_config(path, revision=revision)
        load = dict(revision=revision, use_safetensors=True)
        transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype, **load)
        vae = load_vae(path, revision, dtype)

        tokenizers = [_transformers_class(index, name).from_pretrained(path, subfolder=name, revision=revision)
                      if present(index, name) else None for name, _ in TEXT_COMPONENTS]
        text_encoders = [_transformers_class(index, name).from_pretrained(path, subfolder=name, dtype=dtype, **load)
                         if present(index, name) else None for _, name in TEXT_COMPONENTS]
        scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler", revision=revision)
        return cls(transformer=transformer, vae=vae, tokenizers=tokenizers, text_encoders=text_encoders,
                   scheduler_config=scheduler_config, image_size=image_size)

    # conditioning ---------------------------------------------------------------------------
    def _clip(self, index: int, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """``_get_clip_prompt_embeds``: (penultimate hidden state [B, L, D], projected pooled [B, P]).
        Both CLIP tokenizers pad to the first one's length, as the pipeline does; no attention mask."""
        tokenizer, encoder = self.tokenizers[index], self.text_encoders[index]
        ids = tokenizer(prompts, padding="max_length", max_length=self.tokenizers[0].model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        return out.hidden_states[-2].to(self.text_encoders[0].dtype), out[0]

    def _t5(self, prompts: list[str], device: torch.device) -> Tensor:
        """``_get_t5_prompt_embeds``: T5's last hidden state [B, max_sequence_length, D_t5], or zeros
        of the transformer's joint_attention_dim when T5 is dropped."""
        tokenizer, encoder = self.tokenizers[2], self.text_encoders[2]
        if encoder is None:
            return torch.zeros(len(prompts), self.max_sequence_length, self.denoiser.config.joint_attention_dim,
                               device=device, dtype=self.text_encoders[0].dtype)
        ids = tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids
        return encoder(ids.to(encoder.device))[0].to(device, encoder.dtype)

    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """SD3's ``encode_prompt``: CLIP states padded to T5's width, then T5's along the sequence."""
        states_1, pooled_1 = self._clip(0, prompts)
        states_2, pooled_2 = self._clip(1, prompts)
        device = states_1.device
        clip_states = torch.cat([states_1, states_2.to(device)], dim=-1)
        t5_states = self._t5(prompts, device)
        clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip_states, t5_states], dim=-2),
                "pooled_projections": torch.cat([pooled_1, pooled_2.to(device)], dim=-1)}

    # the network ----------------------------------------------------------------------------
    def output(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Velocity v = eps - x0 [B, C, H, W], float32. ``t`` [B] (or one) is sigma * 1000, passed
        as given (the pipeline passes float timesteps; the transformer embeds t.float()).
        Inputs are cast to the denoiser's dtype (a float16 teacher, a float32 trainable copy)."""
        dtype = next(denoiser.parameters()).dtype
        t = t.reshape(-1)
        t = t.expand(x_t.shape[0]) if t.numel() == 1 else t
        return denoiser(hidden_states=x_t.to(dtype), timestep=t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                        pooled_projections=cond["pooled_projections"].to(dtype)).sample.float()

    def _feature_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        """Up to four evenly spaced blocks, the last one included (LADD reads the teacher's
        transformer blocks' tokens)."""
        blocks = denoiser.transformer_blocks
        count = min(4, len(blocks))
        return [blocks[round((i + 1) * len(blocks) / count) - 1] for i in range(count)]

    def bottleneck(self, denoiser: nn.Module) -> TokenMap:
        """The middle block's image tokens as a map [B, D, h, w]: a transformer has no bottleneck;
        its middle is as far from the input and the output as it gets."""
        blocks = denoiser.transformer_blocks
        return TokenMap(denoiser, blocks[(len(blocks) - 1) // 2], self.patch_size, stream=1)

    def bottleneck_channels(self) -> int:
        return self.denoiser.inner_dim

    def feature_modules(self, denoiser: nn.Module) -> list[TokenMap]:
        """Image tokens of up to four evenly spaced blocks as maps [B, D, h, w] (outputs of the
        views' hooks; ``denoiser_features`` hooks them like any module)."""
        return [TokenMap(denoiser, block, self.patch_size, stream=1) for block in self._feature_blocks(denoiser)]

    def feature_channels(self) -> list[int]:
        return [self.denoiser.inner_dim] * len(self._feature_blocks(self.denoiser))
