"""A small randomly initialised DINOv2 for the digits benchmark's dinov2 discriminator.

    python scripts/make_random_dinov2.py            # -> models/dinov2-random-digits (about 1 MB)

DINOv2's real weights (facebook/dinov2-small) cannot be fetched on our offline machines, so
the digits recipes that use the dinov2 backbone read this stand-in instead: the same
architecture (transformers' Dinov2Model, loaded through from_pretrained), 4 layers of width
96 on 56x56 inputs (16 patches of 14x14), fixed seed. Its features are random projections,
not DINOv2's; results with it say nothing about DINOv2 features. It is generated, not
committed (.gitignore). On a machine with the Hub, point method.gan.discriminator.dinov2 at
facebook/dinov2-small instead.
"""

from __future__ import annotations

import argparse

import torch
from transformers import Dinov2Config, Dinov2Model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/dinov2-random-digits")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    config = Dinov2Config(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384,
                          image_size=56, patch_size=14)
    model = Dinov2Model(config)
    model.save_pretrained(args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, random weights")


if __name__ == "__main__":
    main()
