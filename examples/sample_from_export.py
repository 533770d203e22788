"""Sample from a distill export with stock diffusers only (no import of distill).

    python examples/sample_from_export.py runs/digits-dmd2-1step/export --steps 1 --out grid.png

This is the loop of the export's model card: the scheduler saved with the student is a
stock diffusers class whose ``set_timesteps(N)`` gives the student's own timesteps.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir")
    parser.add_argument("--steps", type=int, default=1, help="the student's number of steps (see its model card)")
    parser.add_argument("--num", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="grid.png")
    args = parser.parse_args()

    pipe = DiffusionPipeline.from_pretrained(args.export_dir)
    unet, scheduler = pipe.unet, pipe.scheduler
    generator = torch.Generator().manual_seed(args.seed)
    labels = None
    if unet.config.num_class_embeds:  # the last class embedding is the null class
        labels = torch.arange(args.num) % (unet.config.num_class_embeds - 1)
    size = unet.config.sample_size
    x = torch.randn((args.num, unet.config.in_channels, size, size), generator=generator)
    scheduler.set_timesteps(args.steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = unet(x, t, class_labels=labels).sample
            x = scheduler.step(output, t, x, generator=generator).prev_sample
    images = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[:, 0].numpy()

    columns = 10
    rows = -(-len(images) // columns)
    grid = np.zeros((rows * size, columns * size), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * size : (r + 1) * size, c * size : (c + 1) * size] = image
    Image.fromarray(grid).resize((columns * size * 4, rows * size * 4), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}: {len(images)} samples, {args.steps} step(s), timesteps {scheduler.timesteps.tolist()}")


if __name__ == "__main__":
    main()
