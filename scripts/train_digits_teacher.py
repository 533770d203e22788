"""Train the built-in digits teacher: a class-conditional pixel UNet2DModel on 8x8 digits.

    python scripts/train_digits_teacher.py --out models/digits-teacher
    python scripts/train_digits_teacher.py --out models/digits-teacher-cosine-v \
        --beta-schedule squaredcos_cap_v2 --prediction-type v_prediction   # a second teacher: other schedule and target

About 22 minutes on 2 CPU cores. Writes a diffusers pipeline directory (model_index.json,
unet/, scheduler/, safetensors) that `distill` loads through `from_pretrained`. The last
class embedding (index 10) is the null class: labels are dropped to it with probability
`--label-dropout`, which is what classifier-free guidance needs at sampling time.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from distill.data import DIGITS_NUM_CLASSES, EpochSampler, load_digits


def build_unet() -> UNet2DModel:
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=DIGITS_NUM_CLASSES + 1,  # + the null class for guidance
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/digits-teacher")
    parser.add_argument("--steps", type=int, default=7200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--label-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beta-schedule", default="linear", help="DDPMScheduler beta_schedule (linear, squaredcos_cap_v2, ...)")
    parser.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction", "sample"])
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    images, labels = load_digits("train")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=args.beta_schedule, prediction_type=args.prediction_type)
    unet = build_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    print(f"teacher parameters: {sum(p.numel() for p in unet.parameters()) / 1e6:.3f}M")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    lr_at = lambda step: min(1.0, (step + 1) / 200) * 0.5 * (1 + torch.cos(torch.tensor(step / args.steps * torch.pi)))
    sampler = EpochSampler(len(labels), args.batch_size, seed=args.seed)
    alphas_cumprod = scheduler.alphas_cumprod
    start = time.time()
    for step in range(args.steps):
        index = sampler.batch(step)
        x0, y = images[index], labels[index].clone()
        y[torch.rand(len(y)) < args.label_dropout] = DIGITS_NUM_CLASSES
        t = torch.randint(0, 1000, (len(y),))
        eps = torch.randn_like(x0)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[args.prediction_type]
        loss = F.mse_loss(unet(x_t, t, class_labels=y).sample, target)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * float(lr_at(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if step % 500 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.0f}s", flush=True)
    DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(args.out, safe_serialization=True)
    print(f"saved {args.out} after {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
