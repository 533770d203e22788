"""Transformer blocks' tokens seen as feature maps, for discriminator heads and DMD2's GAN
head, which read maps [B, C, H, W] as from a UNet block."""

from __future__ import annotations

from torch import Tensor, nn


class _Handles:
    """Removes several hooks at once (what ``register_forward_hook`` returns to its caller)."""

    def __init__(self, handles: list):
        self.handles = handles

    def remove(self):
        for handle in self.handles:
            handle.remove()


class TokenMap(nn.Module):
    """A transformer block's output tokens [B, h * w, D] seen as a feature map [B, D, h, w].

    Not part of the network: ``register_forward_hook(hook)`` hooks the block and calls ``hook``
    with the map instead of the tokens (h, w read from the latents the denoiser is called with,
    [B, C, h * p, w * p], p the patch size). Discriminator backbones and DMD2's bottleneck head
    hook it as they hook a UNet block. The hook's return value is ignored: the tokens flowing
    into the next block are never replaced."""

    def __init__(self, denoiser: nn.Module, block: nn.Module, patch_size: int, stream: int = 0):
        super().__init__()
        self.__dict__["denoiser"] = denoiser  # not submodules: no parameters of its own
        self.__dict__["block"] = block
        self.patch_size = patch_size
        self.stream = stream  # which element of a tuple output holds the image tokens (SD3's joint blocks: 1)

    def forward(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """tokens [B, h * w, D] (row-major patches, as ``PatchEmbed`` flattens them) -> [B, D, h, w]."""
        return tokens.transpose(1, 2).unflatten(2, (height // self.patch_size, width // self.patch_size))

    def register_forward_hook(self, hook, **kwargs) -> _Handles:
        size = {}

        def record_size(module, args, kwargs):
            latents = args[0] if args else kwargs["hidden_states"]
            size["hw"] = latents.shape[-2:]

        def call_with_map(module, args, output):
            tokens = output[self.stream] if isinstance(output, tuple) else output
            hook(self, args, self(tokens, *size["hw"]))

        return _Handles([self.denoiser.register_forward_pre_hook(record_size, with_kwargs=True),
                         self.block.register_forward_hook(call_with_map, **kwargs)])
