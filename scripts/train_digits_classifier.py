"""Train the digits scoring classifier (features for Fréchet distance, and class accuracy).

    python scripts/train_digits_classifier.py --out models/digits-classifier

About a minute on 2 CPU cores. Trains on the digits training split with small random
shifts and noise (so its features also respond to imperfect samples), reports held-out
accuracy, and saves safetensors + config.json loadable by ``DigitsClassifier.from_pretrained``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from distill.data import EpochSampler, load_digits
from distill.features import DigitsClassifier


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    padded = F.pad(images, (1, 1, 1, 1), value=0.0)
    dx, dy = torch.randint(0, 3, (2,), generator=generator).tolist()
    shifted = padded[:, :, dy : dy + 8, dx : dx + 8]
    return (shifted + 0.05 * torch.randn(shifted.shape, generator=generator)).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="models/digits-classifier")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    images, labels = load_digits("train")
    images = (images + 1) / 2
    test_images, test_labels = load_digits("test")
    test_images = (test_images + 1) / 2
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sampler = EpochSampler(len(labels), 128, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        index = sampler.batch(step)
        loss = F.cross_entropy(model(augment(images[index], generator)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 500 == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.no_grad():
        train_acc = (model(images).argmax(1) == labels).float().mean().item()
        test_acc = (model(test_images).argmax(1) == test_labels).float().mean().item()
    print(f"train accuracy {train_acc:.4f}  held-out accuracy {test_acc:.4f} ({len(test_labels)} images)")
    model.save_pretrained(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
