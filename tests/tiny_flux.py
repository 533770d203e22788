"""Tiny FLUX.1 pipelines, built in-process after a seed and saved with safetensors: one shaped
like FLUX.1-dev (guidance embedding, resolution-dependent shift) and one like FLUX.1-schnell (no
guidance embedding, static shift). Nothing here touches the network."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import _clip_special, write_tiny_clip_tokenizer

# the scheduler configs FLUX.1 ships (scheduler/scheduler_config.json of each repository)
DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                         base_image_seq_len=256, max_image_seq_len=4096)


def tiny_t5(d_model: int = 32):
    """A 1-layer T5 encoder and a character Unigram tokenizer (ids 0, 1, 2 = pad, eos, unk, as T5's)."""
    from tokenizers import Tokenizer, models
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + [chr(c) for c in range(33, 127)]
    tokenizer = T5TokenizerFast(tokenizer_object=Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=2)),
                                eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    encoder = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                                      num_heads=4))
    return tokenizer, encoder


def build_tiny_flux(path: Path, guidance_embeds: bool = True) -> Path:
    """A tiny FluxPipeline: 4-channel latents (VAE scale 2, scaling 0.5, shift 0.1, no quant
    convs, as FLUX's VAE), packed to 16 channels; a transformer of 2 double- and 2
    single-stream blocks (inner dim 32, rotary axes 4 + 4 + 8); CLIP (hidden 16: pooled 16, 16
    tokens) and a 1-layer T5 (d_model 32). ``guidance_embeds``: FLUX.1-dev's shape (and its
    dynamic-shift scheduler), else schnell's (static shift 1)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    clip_tokenizer, vocab = write_tiny_clip_tokenizer(path / "_tokenizer_files")
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=16, **_clip_special(vocab)))
    t5_tokenizer, t5 = tiny_t5()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8))
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=16, scaling_factor=0.5, shift_factor=0.1, use_quant_conv=False,
                        use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(**(DEV_SCHEDULER if guidance_embeds else SCHNELL_SCHEDULER))
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
