"""A Stable Diffusion 1.x / 2.x or SDXL pipeline as one ``.safetensors`` checkpoint in the
original key layout (CompVis LDM / Stability SGM), the file AUTOMATIC1111 and ComfyUI load
and diffusers' ``from_single_file`` reads back.

Key layout written (every diffusers tensor renamed one to one; nothing dropped, nothing
unknown passed through):

- UNet ``model.diffusion_model.*``: ``input_blocks.{i}.{0: resnet | 1: transformer}``,
  ``input_blocks.{i}.0.op`` (downsampler), ``middle_block.{0,1,2}``,
  ``output_blocks.{i}.{0: resnet | 1: transformer | 1 or 2: upsampler}``, ``time_embed.{0,2}``,
  ``label_emb.0.{0,2}`` (SDXL's size / crop / pooled-text embedding), ``out.{0,2}``;
  resnets ``in_layers.{0,2}``, ``emb_layers.1``, ``out_layers.{0,3}``, ``skip_connection``.
- VAE ``first_stage_model.*``: ``encoder.down.{i}.block.{j}``, ``.downsample``,
  ``mid.block_{1,2}``, ``mid.attn_1.{norm,q,k,v,proj_out}`` (1x1 convolutions in the original,
  so [C, C, 1, 1]), ``decoder.up.{i}`` numbered from the lowest resolution.
- Text encoders: OpenAI CLIP (SD 1.x; SDXL's first) keeps transformers' names under
  ``cond_stage_model.transformer.text_model.*`` (SD 1.x) or
  ``conditioner.embedders.0.transformer.text_model.*`` (SDXL). OpenCLIP (SD 2.x; SDXL's second)
  goes to open_clip's names under ``cond_stage_model.model.*`` (SD 2.x) or
  ``conditioner.embedders.1.model.*`` (SDXL): ``token_embedding``, ``positional_embedding``,
  ``transformer.resblocks.{n}.{ln_1, attn.in_proj_weight (q, k, v stacked), attn.out_proj,
  ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_final``, ``text_projection`` ([width, projection], the
  transpose of transformers' Linear weight).

Which text-encoder layout an SD pipeline gets follows its encoder's activation: OpenAI's CLIP
uses quick_gelu, OpenCLIP (SD 2.x's ViT-H, SDXL's bigG) gelu. A v-prediction pipeline also
gets ComfyUI's ``v_pred`` marker (an empty tensor; ComfyUI reads it for SDXL and writes it
itself when it saves a v-prediction model). The scheduler is not part of such a file: the
few-step sampler (steps, timesteps, CFG off) has to be chosen in the UI.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
SD1_TEXT, SD2_TEXT = "cond_stage_model.transformer.", "cond_stage_model.model."
SDXL_TEXT, SDXL_TEXT_2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
V_PRED_KEY = "v_pred"


def save_single_file(pipeline, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``pipeline`` (a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``, or
    any pipeline with the same components) as one safetensors file in the original layout
    (``single_file_state_dict``); ``dtype`` casts floating-point tensors (e.g. float16 halves
    the file, as most shared checkpoints are). Returns ``path``."""
    from safetensors.torch import save_file

    state = single_file_state_dict(pipeline)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prediction = pipeline.scheduler.config.get("prediction_type", "epsilon")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, path,
              metadata={"format": "pt", "distill.layout": single_file_layout(pipeline), "distill.prediction_type": prediction})
    return path


def single_file_state_dict(pipeline) -> dict[str, Tensor]:
    """The pipeline's UNet, VAE and text encoder(s) under the original key names (see the
    module docstring). Raises for a pipeline or module this layout has no names for."""
    layout = single_file_layout(pipeline)
    state = _prefixed(UNET_PREFIX, unet_to_ldm(pipeline.unet.state_dict(), dict(pipeline.unet.config)))
    state.update(_prefixed(VAE_PREFIX, vae_to_ldm(pipeline.vae.state_dict(), dict(pipeline.vae.config))))
    if layout == "sdxl":
        state.update(_prefixed(SDXL_TEXT, clip_to_ldm(pipeline.text_encoder.state_dict())))
        state.update(_prefixed(SDXL_TEXT_2, open_clip_to_ldm(pipeline.text_encoder_2.state_dict())))
    elif layout == "sd2":
        state.update(_prefixed(SD2_TEXT, open_clip_to_ldm(pipeline.text_encoder.state_dict())))
    else:
        state.update(_prefixed(SD1_TEXT, clip_to_ldm(pipeline.text_encoder.state_dict())))
    if pipeline.scheduler.config.get("prediction_type") == "v_prediction":
        state[V_PRED_KEY] = torch.tensor([])
    return state


def single_file_layout(pipeline) -> str:
    """"sd1", "sd2" or "sdxl": which original checkpoint layout the pipeline's parts take."""
    missing = [name for name in ("unet", "vae", "text_encoder") if getattr(pipeline, name, None) is None]
    if missing:
        raise ValueError(f"{type(pipeline).__name__} has no {missing}: a single-file checkpoint holds an SD / SDXL UNet, "
                         "VAE and text encoder(s)")
    if getattr(pipeline, "text_encoder_2", None) is not None:
        return "sdxl"
    activation = pipeline.text_encoder.config.hidden_act
    if activation not in ("quick_gelu", "gelu"):
        raise ValueError(f"text encoder activation {activation!r} is neither OpenAI CLIP's (quick_gelu, SD 1.x) nor "
                         "OpenCLIP's (gelu, SD 2.x)")
    return "sd1" if activation == "quick_gelu" else "sd2"


def _prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in state.items()}


def _renamed(state: dict[str, Tensor], rename, what: str) -> dict[str, Tensor]:
    """Apply ``rename(key) -> new key | None`` to every key; raise for keys without a name
    (None) and for two keys given one name."""
    out, unknown = {}, []
    for key, value in state.items():
        new = rename(key)
        if new is None:
            unknown.append(key)
        elif new in out:
            raise ValueError(f"{what}: two tensors map to {new!r}")
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"{what}: no original-layout name for {len(unknown)} tensor(s), e.g. {unknown[:5]}")
    return out


# ------------------------------------------------------------------------------------------ UNet
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str | None:
    layer, _, tail = rest.partition(".")
    return f"{_RESNET[layer]}.{tail}" if layer in _RESNET else None


def unet_to_ldm(state: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict (SD 1.x / 2.x / SDXL: cross-attention
    and plain down / up blocks, ``UNetMidBlock2DCrossAttn``, one ``layers_per_block``) under
    the LDM / SGM ``openaimodel.UNetModel`` names, without the ``model.diffusion_model.`` prefix.

    Block numbering: down block b's layer j is ``input_blocks[1 + b (L + 1) + j]`` and its
    downsampler ``input_blocks[1 + b (L + 1) + L]``; up block b's layer j (L + 1 of them) is
    ``output_blocks[b (L + 1) + j]``, its upsampler the last layer's module 1, or 2 after a
    transformer."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError(f"the original UNet layout has one layers_per_block, this UNet has {per_block}")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"the original UNet layout has a cross-attention mid block, this UNet has {config['mid_block_type']}")
    step = per_block + 1
    attention_up = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}

    def rename(key: str) -> str | None:
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            return f"{_UNET_TOP[module]}.{param}"
        if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + b * step + j
            inner = _resnet(rest) if kind == "resnets" else rest
            return inner and f"input_blocks.{index}.{0 if kind == 'resnets' else 1}.{inner}"
        if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
            return f"input_blocks.{1 + int(m[1]) * step + per_block}.0.op.{m[2]}"
        if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", key):
            inner = _resnet(m[2])
            return inner and f"middle_block.{2 * int(m[1])}.{inner}"
        if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            return f"middle_block.1.{m[1]}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            inner = _resnet(rest) if kind == "resnets" else rest
            return inner and f"output_blocks.{b * step + j}.{0 if kind == 'resnets' else 1}.{inner}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
            b = int(m[1])
            return f"output_blocks.{b * step + per_block}.{2 if b in attention_up else 1}.conv.{m[2]}"
        return None

    return _renamed(state, rename, "UNet")


# ------------------------------------------------------------------------------------------ VAE
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKL`` state dict under the LDM ``AutoencoderKL`` names (without
    ``first_stage_model.``); the mid-block attention's linear weights become the original's
    1x1 convolutions [C, C, 1, 1]."""
    num_up = len(config["up_block_types"])
    out = {}

    def rename(key: str) -> str | None:
        module, _, param = key.rpartition(".")
        part, _, rest = module.partition(".")
        if module in ("quant_conv", "post_quant_conv"):
            return key
        if part not in ("encoder", "decoder"):
            return None
        if rest in ("conv_in", "conv_out"):
            return key
        if rest == "conv_norm_out":
            return f"{part}.norm_out.{param}"
        if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)", rest):
            level = int(m[2]) if m[1] == "down" else num_up - 1 - int(m[2])
            layer = "nin_shortcut" if m[4] == "conv_shortcut" else m[4]
            return f"{part}.{m[1]}.{level}.block.{m[3]}.{layer}.{param}"
        if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", rest):
            return f"{part}.down.{m[1]}.downsample.conv.{param}"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", rest):
            return f"{part}.up.{num_up - 1 - int(m[1])}.upsample.conv.{param}"
        if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(norm1|conv1|norm2|conv2)", rest):
            return f"{part}.mid.block_{int(m[1]) + 1}.{m[2]}.{param}"
        if m := re.fullmatch(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)", rest):
            return f"{part}.mid.attn_1.{_VAE_ATTENTION[m[1]]}.{param}"
        return None

    for key, value in _renamed(state, rename, "VAE").items():
        conv = re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2
        out[key] = value[:, :, None, None] if conv else value
    return out


# ------------------------------------------------------------------------------------------ text encoders
def _text_model_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers' CLIP text state dict with every text-tower key under ``text_model.``
    (transformers 5 dropped that level from ``CLIPTextModel``; the original files keep it)."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in state.items()}


def clip_to_ldm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An OpenAI-CLIP ``CLIPTextModel`` state dict in the original files' layout:
    transformers' own names under ``text_model.`` (``position_ids`` is not a weight)."""
    state = _text_model_keys(state)
    extra = [k for k in state if not k.startswith("text_model.")]
    if extra:
        raise ValueError(f"OpenAI CLIP text encoder: the original layout has no place for {extra}")
    return {k: v for k, v in state.items() if not k.endswith("position_ids")}


_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_to_ldm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` state dict of an OpenCLIP text
    tower under open_clip's names (without the ``cond_stage_model.model.`` /
    ``conditioner.embedders.1.model.`` prefix): q, k and v stacked into ``attn.in_proj_*``
    [3 width, width], ``text_projection`` transposed to [width, projection]."""
    state = {k: v for k, v in _text_model_keys(state).items() if not k.endswith("position_ids")}  # consumed below
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias"}
    out = {name: state.pop(key) for key, name in fixed.items() if key in state}
    if "text_projection.weight" in state:
        out["text_projection"] = state.pop("text_projection.weight").T.contiguous()
    layers = sorted({int(m[1]) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    for n in layers:
        source, target = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for param in ("weight", "bias"):
            qkv = [f"{source}self_attn.{x}_proj.{param}" for x in "qkv"]
            if all(k in state for k in qkv):
                out[f"{target}attn.in_proj_{param}"] = torch.cat([state.pop(k) for k in qkv])
            for ours, theirs in _OPEN_CLIP_LAYER.items():
                if f"{source}{ours}.{param}" in state:
                    out[f"{target}{theirs}.{param}"] = state.pop(f"{source}{ours}.{param}")
    if state:
        raise ValueError(f"OpenCLIP text encoder: no original-layout name for {sorted(state)[:5]}")
    return out
