"""Adapters for diffusers latent diffusion transformers: DiT (``DiTPipeline``, class-conditional,
Peebles & Xie 2023) and PixArt-alpha / PixArt-Sigma (``PixArtAlphaPipeline`` /
``PixArtSigmaPipeline``, T5 text conditioning, Chen et al. 2023 / 2024).

Both are latent models over the same VAE as Stable Diffusion (x0 = latent * scaling_factor;
``encode_images`` / ``decode`` are the SD adapter's) whose denoiser is a patch transformer:

* The checkpoints learn the reverse-process variance too (``out_channels = 2 * in_channels``).
  As the stock pipelines do, ``output`` keeps only the first ``in_channels`` channels: the
  epsilon prediction [B, C, H, W]; the variance half is dropped.
* The network's "features" for discriminators are its transformer blocks' output tokens
  [B, h * w, D], seen as maps [B, D, h, w] (h, w: the latent size over the patch size) by
  ``TokenMap``; the "bottleneck" (DMD2's GAN head) is the middle block.

DiT conditions on ``{"class_labels": [B]}``; its null class for classifier-free guidance is the
extra label embedding at index ``num_embeds_ada_norm`` (1000 for the ImageNet checkpoints; the
stock pipeline writes the literal 1000). PixArt conditions on
``{"encoder_hidden_states": [B, L, D], "encoder_attention_mask": [B, L]}`` (T5 last hidden
state and its token mask, L = 120 for alpha and 300 for Sigma, the pipelines' defaults), plus
``"resolution"`` [B, 2] and ``"aspect_ratio"`` [B, 1] for transformers that take them
(PixArt-alpha 1024). Prompts are encoded exactly as the pipelines' ``encode_prompt`` encodes
them without ``clean_caption`` (lower-cased and stripped); its null conditioning is the encoded
empty prompt, as the pipelines' default negative prompt.
"""

from __future__ import annotations

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline
from torch import Tensor, nn

from distill.schedules import schedule_from_config
from distill.teachers.base import TeacherBase, cached_condition, component_class, present
from distill.teachers.stable_diffusion import (StableDiffusionTeacher, _transformers_class, latent_side, load_vae,
                                               vae_scale_factor)
from distill.teachers.tokens import TokenMap


class _LatentTransformerTeacher(TeacherBase):
    """Shared by DiT and PixArt: a patch transformer over VAE latents, epsilon (or v) prediction
    on a DDPM schedule, learned variance dropped. Subclasses define the conditioning."""

    component = "transformer"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")  # attention, feed-forward
    guidance, null_first = "cfg", True  # the CFG batch order is the pipeline's (PixArt: null, cond; DiT: cond, null)

    # the VAE side is Stable Diffusion's: scaled (shifted) latents, decode differentiable
    _latent_affine = StableDiffusionTeacher._latent_affine
    encode_images = StableDiffusionTeacher.encode_images
    decode = StableDiffusionTeacher.decode

    def __init__(self, *, transformer: nn.Module, vae: AutoencoderKL, scheduler_config: dict, image_size: int | None = None):
        channels = transformer.config.in_channels
        if channels != vae.config.latent_channels:
            raise ValueError(f"the transformer takes {channels} input channels but the VAE's latents have "
                             f"{vae.config.latent_channels}")
        if transformer.out_channels not in (channels, 2 * channels):
            raise ValueError(f"the transformer outputs {transformer.out_channels} channels; expected {channels} "
                             f"or {2 * channels} (with the learned variance)")
        self.denoiser = transformer.requires_grad_(False).eval()
        self.vae = vae.requires_grad_(False).eval()
        self.scheduler_config = dict(scheduler_config)
        self.schedule = schedule_from_config(self.scheduler_config)
        self.prediction_type = self.schedule.prediction_type
        self.patch_size = transformer.config.patch_size
        self.vae_scale_factor = vae_scale_factor(vae)
        # the patch embedding interpolates its positional embedding to other sizes
        side = latent_side(image_size, transformer.config.sample_size, self.vae_scale_factor, self.patch_size)
        self.sample_shape = (channels, side, side)
        self.image_size = (side * self.vae_scale_factor, side * self.vae_scale_factor)

    def _frozen(self) -> list[nn.Module]:
        return [self.denoiser, self.vae]

    def to(self, device):
        for module in self._frozen():
            module.to(device)
        return self

    # the network ----------------------------------------------------------------------------
    def _transformer_kwargs(self, cond: dict[str, Tensor], dtype: torch.dtype) -> dict:
        raise NotImplementedError

    def output(self, denoiser: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """Model output [B, C, H, W], float32, in the checkpoint's prediction type: the first C of
        the transformer's channels (the rest is the learned variance, which the pipelines drop
        too). Inputs are cast to the denoiser's dtype."""
        dtype = next(denoiser.parameters()).dtype
        t = t.reshape(-1)
        t = t.expand(x_t.shape[0]) if t.numel() == 1 else t
        out = denoiser(x_t.to(dtype), timestep=t, **self._transformer_kwargs(cond, dtype)).sample
        return out[:, : x_t.shape[1]].float()

    def bottleneck(self, denoiser: nn.Module) -> TokenMap:
        """The middle transformer block's tokens as a map [B, D, h, w]: a transformer has no
        bottleneck; its middle is as far from the input and the output as it gets."""
        blocks = denoiser.transformer_blocks
        return TokenMap(denoiser, blocks[len(blocks) // 2], self.patch_size)

    def bottleneck_channels(self) -> int:
        return self.denoiser.inner_dim

    def feature_modules(self, denoiser: nn.Module) -> list[TokenMap]:
        """Every transformer block's output tokens as a map [B, D, h, w] (LADD, Sauer et al. 2024,
        reads the tokens of the teacher's transformer blocks); a discriminator's ``layers``
        picks among them."""
        return [TokenMap(denoiser, block, self.patch_size) for block in denoiser.transformer_blocks]

    def feature_channels(self) -> list[int]:
        return [self.denoiser.inner_dim] * len(self.denoiser.transformer_blocks)

    # loading helpers ------------------------------------------------------------------------
    @staticmethod
    def _load_common(path: str, revision: str | None, dtype: torch.dtype) -> tuple[dict, nn.Module, AutoencoderKL, dict]:
        """(model_index, transformer, VAE, raw scheduler config) of a pipeline directory or hub id.
        The transformer's class is the one model_index.json names: diffusers maps the legacy
        ``Transformer2DModel`` to ``DiTTransformer2DModel`` / ``PixArtTransformer2DModel`` by its norm type."""
        index = DiffusionPipeline.load_config(path, revision=revision)
        library, class_name = index["transformer"]
        if library != "diffusers" or not hasattr(diffusers, class_name):
            raise ValueError(f"the transformer is {library}.{class_name}; expected a diffusers model class")
        load = dict(revision=revision, use_safetensors=True)
        transformer = getattr(diffusers, class_name).from_pretrained(path, subfolder="transformer", torch_dtype=dtype, **load)
        vae = load_vae(path, revision, dtype)
        scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler", revision=revision)  # the raw dict
        return index, transformer, vae, scheduler_config


class DiTTeacher(_LatentTransformerTeacher):
    """DiT (``DiTPipeline``): class-conditional; conditioning ``{"class_labels": [B] long}``.

    ``num_classes`` is ``num_embeds_ada_norm`` (the real classes); the label embedding has one
    more row, the null class, which guidance uses. The label embedders' random label dropout
    (the checkpoint's guidance training, active in train mode) is switched off: a student or
    fake score copied from this denoiser is always conditioned on the labels it is given."""

    family = "DiT (DiTPipeline)"
    null_first = False  # DiTPipeline batches (cond, null)
    # DiTPipeline scales the model input but not the initial noise, and calls scheduler.step without its generator
    scales_initial_noise = step_uses_generator = False

    @classmethod
    def reads(cls, index: dict) -> bool:
        """A DiT transformer over a VAE; legacy checkpoints name ``Transformer2DModel`` for DiT and
        PixArt alike (diffusers remaps it by norm type): without a text encoder, it is DiT."""
        name = component_class(index, "transformer")
        return present(index, "vae") and (name == "DiTTransformer2DModel"
                                          or name == "Transformer2DModel" and not present(index, "text_encoder"))

    def pipeline_kwargs(self) -> dict:
        return {"guidance_scale": 1.0}  # DiTPipeline guides at scales above 1

    def __init__(self, *, transformer: nn.Module, vae: AutoencoderKL, scheduler_config: dict, image_size: int | None = None):
        if transformer.config.get("norm_type") != "ada_norm_zero" or not transformer.config.get("num_embeds_ada_norm"):
            raise ValueError("a DiT transformer has norm_type 'ada_norm_zero' and num_embeds_ada_norm classes")
        super().__init__(transformer=transformer, vae=vae, scheduler_config=scheduler_config, image_size=image_size)
        self.num_classes = transformer.config.num_embeds_ada_norm
        self.null_class = self.num_classes  # LabelEmbedding's extra (guidance) row
        for module in transformer.modules():
            if isinstance(module, diffusers.models.embeddings.LabelEmbedding):
                if not module.embedding_table.num_embeddings > self.num_classes:
                    raise ValueError("the DiT's label embedding has no null class row: guidance is impossible")
                module.dropout_prob = 0.0  # table size is already fixed; this only stops train-mode label dropout
        self.head_condition_dim = None

    @classmethod
    def from_pipeline(cls, pipe, image_size: int | None = None) -> "DiTTeacher":
        return cls(transformer=pipe.transformer, vae=pipe.vae, image_size=image_size,
                   scheduler_config={**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__})

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                        image_size: int | None = None) -> "DiTTeacher":
        """Load the transformer, VAE and scheduler config of a DiTPipeline directory or hub id in
        ``dtype`` (safetensors only). ``image_size``: the side to train and sample at."""
        _, transformer, vae, scheduler_config = cls._load_common(path, revision, dtype)
        return cls(transformer=transformer, vae=vae, scheduler_config=scheduler_config, image_size=image_size)

    def condition(self, batch: dict) -> dict[str, Tensor]:
        cached = cached_condition(batch)
        if cached is not None:
            return cached
        return {"class_labels": torch.as_tensor(batch["class_label"]).long()}

    def null_condition(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"class_labels": torch.full_like(cond["class_labels"], self.null_class)}

    def head_condition(self, cond: dict[str, Tensor]) -> Tensor:
        """The class labels [B] (the GAN heads embed them; the null class is their last row)."""
        return cond["class_labels"]

    def _transformer_kwargs(self, cond: dict[str, Tensor], dtype: torch.dtype) -> dict:
        return {"class_labels": cond["class_labels"]}


class PixArtTeacher(_LatentTransformerTeacher):
    """PixArt-alpha / PixArt-Sigma: a T5 encoder; conditioning ``{"encoder_hidden_states":
    [B, L, D], "encoder_attention_mask": [B, L]}`` (+ ``"resolution"`` [B, 2] (H, W in pixels)
    and ``"aspect_ratio"`` [B, 1] (H / W) where the transformer uses additional conditions).

    GAN heads need one vector per prompt and T5 has no pooled output: ``head_condition`` is the
    mask-weighted mean of the T5 hidden states [B, D] (``head_condition_dim`` = T5's d_model)."""

    family = "PixArt-alpha / Sigma (PixArtAlphaPipeline, PixArtSigmaPipeline: a T5 text_encoder)"
    null_first = True  # the pipelines batch (negative, prompt)

    @classmethod
    def reads(cls, index: dict) -> bool:
        return (present(index, "vae") and component_class(index, "text_encoder") == "T5EncoderModel"
                and component_class(index, "transformer") in ("PixArtTransformer2DModel", "Transformer2DModel"))

    def pipeline_kwargs(self) -> dict:
        """No guidance; prompts encoded as this adapter encodes them (``clean_caption`` off) and
        sampled at the trained size itself (no resolution binning)."""
        return {"guidance_scale": 0.0, "clean_caption": False, "use_resolution_binning": False}

    def __init__(self, *, transformer: nn.Module, vae: AutoencoderKL, tokenizer, text_encoder: nn.Module, scheduler_config: dict,
                 max_sequence_length: int, image_size: int | None = None):
        if transformer.config.get("norm_type") != "ada_norm_single":
            raise ValueError(f"a PixArt transformer has norm_type 'ada_norm_single', got {transformer.config.get('norm_type')!r}")
        super().__init__(transformer=transformer, vae=vae, scheduler_config=scheduler_config, image_size=image_size)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.max_sequence_length = max_sequence_length
        # PixArt-alpha 1024 embeds (H, W) and H / W with the timestep; the transformer's own flag
        # (default: sample_size 128), the case in which the alpha pipeline passes them
        self.use_additional_conditions = bool(transformer.use_additional_conditions)
        self.num_classes = None
        self.head_condition_dim = text_encoder.config.d_model
        with torch.no_grad():  # encoded once: every guided step needs it
            self._null = self._encode([""])

    def _frozen(self) -> list[nn.Module]:
        return [*super()._frozen(), self.text_encoder]

    def to(self, device) -> "PixArtTeacher":
        super().to(device)
        self._null = {k: v.to(device) for k, v in self._null.items()}
        return self

    @classmethod
    def _max_sequence_length(cls, pipeline_class: str | None) -> int:
        """The pipelines' default prompt length: 300 tokens for Sigma, 120 for alpha."""
        return 300 if pipeline_class == "PixArtSigmaPipeline" else 120

    @classmethod
    def from_pipeline(cls, pipe, image_size: int | None = None) -> "PixArtTeacher":
        return cls(transformer=pipe.transformer, vae=pipe.vae, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                   scheduler_config={**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__},
                   max_sequence_length=cls._max_sequence_length(type(pipe).__name__), image_size=image_size)

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                        image_size: int | None = None) -> "PixArtTeacher":
        """Load the transformer, VAE, T5 tokenizer and encoder and the scheduler config of a PixArt
        pipeline directory or hub id in ``dtype`` (safetensors only)."""
        index, transformer, vae, scheduler_config = cls._load_common(path, revision, dtype)
        tokenizer = _transformers_class(index, "tokenizer").from_pretrained(path, subfolder="tokenizer", revision=revision)
        text_encoder = _transformers_class(index, "text_encoder").from_pretrained(
            path, subfolder="text_encoder", dtype=dtype, revision=revision, use_safetensors=True)
        return cls(transformer=transformer, vae=vae, tokenizer=tokenizer, text_encoder=text_encoder,
                   scheduler_config=scheduler_config, max_sequence_length=cls._max_sequence_length(index.get("_class_name")),
                   image_size=image_size)

    # conditioning ---------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        """The pipelines' ``encode_prompt`` (clean_caption off): lower-cased, stripped prompts,
        padded / truncated to max_sequence_length; the T5 last hidden state and the token mask."""
        tokens = self.tokenizer([p.lower().strip() for p in prompts], padding="max_length", max_length=self.max_sequence_length,
                                truncation=True, add_special_tokens=True, return_tensors="pt")
        device = self.text_encoder.device
        mask = tokens.attention_mask.to(device)
        states = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].to(self.text_encoder.dtype)
        cond = {"encoder_hidden_states": states, "encoder_attention_mask": mask}
        if self.use_additional_conditions:
            height, width = self.image_size
            cond["resolution"] = torch.tensor([[height, width]], dtype=states.dtype, device=device).expand(len(prompts), -1)
            cond["aspect_ratio"] = torch.tensor([[height / width]], dtype=states.dtype, device=device).expand(len(prompts), -1)
        return cond

    # prompts (cached or encoded by _encode) and the empty prompt: as Stable Diffusion's
    condition = StableDiffusionTeacher.condition
    null_condition = StableDiffusionTeacher.null_condition

    def head_condition(self, cond: dict[str, Tensor]) -> Tensor:
        """Mask-weighted mean of the T5 hidden states [B, head_condition_dim], float32."""
        mask = cond["encoder_attention_mask"].float().unsqueeze(-1)
        return (cond["encoder_hidden_states"].float() * mask).sum(1) / mask.sum(1).clamp(min=1)

    def _transformer_kwargs(self, cond: dict[str, Tensor], dtype: torch.dtype) -> dict:
        added = {"resolution": None, "aspect_ratio": None}
        if self.use_additional_conditions:
            added = {"resolution": cond["resolution"].to(dtype), "aspect_ratio": cond["aspect_ratio"].to(dtype)}
        return {"encoder_hidden_states": cond["encoder_hidden_states"].to(dtype),
                "encoder_attention_mask": cond["encoder_attention_mask"], "added_cond_kwargs": added}
