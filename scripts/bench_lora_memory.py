"""Memory of DMD2 training: three full networks vs one frozen base shared by LoRA roles.

    python scripts/bench_lora_memory.py
    python scripts/bench_lora_memory.py --channels 64,128 --rank 4 --steps 3 --modes full shared

Builds a small SD-1.5-shaped pipeline in a temporary directory (a cross-attention UNet with
``--channels``, a 2-layer CLIP text encoder, a tiny VAE; 32x32 images, 16x16x4 latents) and
an 8-image caption folder, then trains ``recipes/sd15-dmd2-4step-lora.yaml`` on it for a few
steps with the real entry point (``python -m distill.train <recipe> <overrides>``, run
in-process by a fresh Python per mode so each peak is its own) in three modes:

    full     teacher + full student + full fake score (student.lora.rank=0, fake_score_lora.rank=0)
    student  LoRA student on the teacher's base + full fake score
    shared   LoRA student and LoRA fake score on the teacher's base: one UNet for three roles

For each it prints, after training, the bytes of every live module's weights (unique
storages, so shared weights count once; text encoder and VAE included), of the weights the
optimizers train and of their state; the peak resident memory above the memory after
imports (``resource.getrusage(RUSAGE_SELF).ru_maxrss``); and, on a GPU, the peak CUDA
allocation (``torch.cuda.max_memory_allocated``). CPU: float32, no mixed precision; CUDA: the
recipe's float16 teacher and fp16 mixed precision. Takes about 80 seconds on 2 CPU cores
with the default 128,256 channels (a 17M-parameter UNet).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "sd15-dmd2-4step-lora.yaml"
MODES = {"full": (0, 0), "student": (1, 0), "shared": (1, 1)}  # (student LoRA?, fake score LoRA?)
MB = 2**20


# ------------------------------------------------------------------------------------------ the pipeline
def build_pipeline(path: Path, channels: tuple[int, ...]) -> Path:
    """A randomly initialised SD-1.5-shaped pipeline saved to ``path``, with a byte-level CLIP
    tokenizer written here (single characters, no merges: any text tokenizes offline)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(0)
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)
    width = channels[0]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    n = len(channels)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=width, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=32, scaling_factor=0.5)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(path, safe_serialization=True)
    return path


def write_captions(path: Path) -> Path:
    """8 random 32x32 images with captions, as an imagefolder (metadata.jsonl)."""
    import numpy as np
    from PIL import Image

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a picture number {i}"})
    (path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overrides(mode: str, *, teacher: Path, data: Path, run: Path, rank: int, steps: int, cuda: bool) -> list[str]:
    student_lora, fake_lora = MODES[mode]
    precision = [] if cuda else ["teacher.dtype=float32", "train.mixed_precision=no"]
    return [
        f"teacher.path={teacher}", f"data.path={data}", "data.resolution=32", "data.batch_size=2", f"output_dir={run}",
        f"student.lora.rank={rank * student_lora}", f"method.fake_score_lora.rank={rank * fake_lora}",
        "method.critic_updates=1", "method.gan.discriminator.head_width=16", f"train.max_steps={steps}",
        f"train.checkpoint_every={steps}", "train.sample_every=0", "train.max_minutes=null", "optim.student.warmup_steps=0",
        "optim.critic.warmup_steps=0", "eval.every=0", "eval.features=[]", "eval.clip=null", *precision,
    ]


# ------------------------------------------------------------------------------------------ one mode, in a fresh process
def _rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _live_bytes() -> dict:
    """Bytes of every live module's weights (unique storages: shared weights count once), of
    the weights the optimizers train, and of the optimizers' state; and the number of live
    LoRA roles."""
    import gc

    import torch

    from distill.students import LoraRole

    gc.collect()  # drop unreachable copies (e.g. the last sampling copy) before counting
    weights, trained, state, roles = {}, {}, {}, 0
    for obj in gc.get_objects():
        if isinstance(obj, LoraRole):
            roles += 1
        if isinstance(obj, torch.nn.Module):
            for p in [*obj.parameters(recurse=False), *obj.buffers(recurse=False)]:
                weights[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
        elif isinstance(obj, torch.optim.Optimizer):
            for group in obj.param_groups:
                for p in group["params"]:
                    trained[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
            for values in obj.state.values():
                for v in values.values():
                    if torch.is_tensor(v):
                        state[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return {"weights_mb": sum(weights.values()) / MB, "trained_mb": sum(trained.values()) / MB,
            "optimizer_mb": sum(state.values()) / MB, "lora_roles": roles}


def child(argv: list[str]) -> None:
    """Train once through distill.train's entry point and print one JSON line of measurements."""
    import peft  # noqa: F401  (imported in every mode, so the baseline after imports is the same)
    import torch

    from distill import train
    from distill.trainer import DistillTrainer

    baseline = _rss_bytes()
    measured = {}
    train_loop = DistillTrainer.train

    def measuring_train(self):
        result = train_loop(self)
        measured.update(_live_bytes())  # after training: models, gradients' owners and optimizer state all alive
        return result

    DistillTrainer.train = measuring_train
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train.main(argv)
    measured["peak_rss_above_imports_mb"] = (_rss_bytes() - baseline) / MB
    measured["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / MB if torch.cuda.is_available() else None
    print("RESULT " + json.dumps(measured))


# ------------------------------------------------------------------------------------------ the table
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", default="128,256", help="UNet block_out_channels (default 128,256)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the LoRA roles (alpha = the recipe's)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per mode")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return

    import torch

    cuda = torch.cuda.is_available()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",  # this checkout's distill
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        tmp = Path(tmp)
        teacher = build_pipeline(tmp / "teacher", tuple(int(c) for c in args.channels.split(",")))
        data = write_captions(tmp / "captions")
        rows = {}
        for mode in args.modes:
            argv = [str(RECIPE), *overrides(mode, teacher=teacher, data=data, run=tmp / f"run-{mode}", rank=args.rank,
                                             steps=args.steps, cuda=cuda)]
            print(f"[{mode}] python -m distill.train {' '.join(argv)}", flush=True)
            result = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, env=env,
                                    cwd=REPO)
            lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
            if result.returncode != 0 or not lines:
                sys.exit(f"[{mode}] failed:\n{result.stderr[-3000:]}")
            rows[mode] = json.loads(lines[-1][len("RESULT "):])

    header = "| mode | LoRA roles | weights (MB) | trained by the optimizers (MB) | optimizer state (MB) | peak RSS above imports (MB) |"
    header += " peak CUDA allocated (MB) |" if cuda else ""
    print(f"\nchannels {args.channels}, rank {args.rank}, {args.steps} steps, {'CUDA' if cuda else 'CPU float32'}\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for mode, r in rows.items():
        line = (f"| {mode} | {r['lora_roles']} | {r['weights_mb']:.1f} | {r['trained_mb']:.1f} | {r['optimizer_mb']:.1f} | "
                f"{r['peak_rss_above_imports_mb']:.1f} |")
        print(line + (f" {r['cuda_peak_mb']:.1f} |" if cuda else ""))
    if any(MODES[mode] != (0, 0) and r["lora_roles"] == 0 for mode, r in rows.items()):
        print("\nnote: the trainer built no LoRA roles in a LoRA mode: it does not read student.lora / "
              "method.fake_score_lora yet, so those rows are full copies too")


if __name__ == "__main__":
    main()
