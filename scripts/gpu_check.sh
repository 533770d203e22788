#!/usr/bin/env bash
# The GPU check of issue 13, one table in at most 8 minutes on one GPU (sized for an 80-140 GB card).
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # OUT_DIR (default gpu-check/) receives table.md and logs
#
# Rows, each with a time budget (seconds) so the whole fits in 8 minutes (470 s):
#   tests       pytest -m gpu (the GPU-marked tests: approximated R1 under bf16 / fp16 / fp32)   50
#   bench       scripts/bench_scale.py in bf16 at the recipes' resolutions: SDXL UNet at 1024 px
#               shared-base LoRA and full student (110), SD3-medium shared base (60), FLUX.1
#               shared base with gradient checkpointing (80; full copies: computed, not run)
#   fsdp2       accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 1
#               of recipes/sd15-dmd2-1step.yaml on a tiny SD pipeline, bf16, 2 steps, EMA       50
#   fsdp2-lora  the same launch of recipes/sd15-dmd2-4step-lora.yaml (LoRA student + LoRA fake
#               score: the shared base sharded once), bf16 teacher and autocast, 2 steps, EMA   60
#   zero2       the same through configs/accelerate/deepspeed-zero2.yaml (needs deepspeed)         50
#   r1          the approximated-R1 penalty of one discriminator under bf16 / fp16 / fp32 autocast:
#               in distill's float32 context and, for contrast, left to autocast                 10
# Nothing here downloads: the bench builds random weights from scripts/scale_configs, the tiny
# pipeline comes from tests/conftest.py. Not yet run on a GPU (see docs/scale.md).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
WORK=$(mktemp -d /tmp/gpu-check-XXXX)
TABLE="$OUT/table.md"
echo "| check | result | detail |" > "$TABLE"
echo "|---|---|---|" >> "$TABLE"
row() { echo "| $1 | $2 | $3 |" >> "$TABLE"; }
started=$(date +%s)

# ---- GPU-marked tests
if timeout 50 python -m pytest -q -p no:cacheprovider -m gpu tests/ > "$OUT/tests.log" 2>&1; then
  row "pytest -m gpu" pass "$(tail -1 "$OUT/tests.log")"
else
  row "pytest -m gpu" FAIL "$(tail -1 "$OUT/tests.log") (see tests.log)"
fi

# ---- bench_scale rows in bf16
bench() {  # label, seconds, then bench_scale arguments
  local label=$1 limit=$2; shift 2
  if timeout "$limit" python scripts/bench_scale.py --dtype bfloat16 --mixed-precision bf16 --steps 3 --max-gb 130 \
      --work "$WORK/bench" --out "$OUT/bench.jsonl" --label "$label" "$@" > "$OUT/bench-$label.log" 2>&1; then
    row "bench $label" done "$(grep -E 'peak|computed only' "$OUT/bench-$label.log" | tr '\n' ' ' | tr -s ' ')"
  else
    row "bench $label" FAIL "exit $? (see bench-$label.log)"
  fi
}
bench sdxl-1024 110 --models sdxl --modes shared full --resolution 1024
bench sd3-1024 60 --models sd3 --modes shared --resolution 1024
bench flux-512 80 --models flux --modes shared full --resolution 512 --gradient-checkpointing
[ -f "$OUT/bench.jsonl" ] && python scripts/bench_scale.py --table "$OUT/bench.jsonl" > "$OUT/bench.md"  # the docs/scale.md table

# ---- FSDP2 and ZeRO-2 through accelerate launch, one GPU, a tiny SD pipeline
python - "$WORK" <<'EOF' > "$WORK/tiny-args.txt"
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import TEXT_PROMPTS, build_tiny_sd, latent_recipe_overrides
work = Path(sys.argv[1])
teacher = build_tiny_sd(work / "tiny-sd")
(work / "prompts.txt").write_text("\n".join(TEXT_PROMPTS) + "\n")
args = latent_recipe_overrides("recipes/sd15-dmd2-1step.yaml", teacher, work, work / "RUN",
                               **{"train.mixed_precision": "bf16", "train.sample_every": 0, "train.ema_decay": 0.99})
print("\n".join(a for a in args if not a.startswith("data.path")) + f"\ndata.path={work / 'prompts.txt'}")
EOF
python - "$WORK" <<'EOF' > "$WORK/tiny-lora-args.txt"  # the LoRA recipe reads images: 8 random ones, captioned
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
sys.path.insert(0, "tests")
from conftest import TEXT_PROMPTS, latent_recipe_overrides
work = Path(sys.argv[1])
images = work / "images"
images.mkdir(exist_ok=True)
rng = np.random.default_rng(0)
rows = []
for i in range(8):
    Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    rows.append(json.dumps({"file_name": f"{i}.png", "text": TEXT_PROMPTS[i % len(TEXT_PROMPTS)]}))
(images / "metadata.jsonl").write_text("\n".join(rows) + "\n")
args = latent_recipe_overrides("recipes/sd15-dmd2-4step-lora.yaml", work / "tiny-sd", work, work / "RUN",
                               **{"train.mixed_precision": "bf16", "teacher.dtype": "bfloat16", "train.sample_every": 0,
                                  "train.ema_decay": 0.99, "student.lora.rank": 4, "method.fake_score_lora.rank": 4})
print("\n".join(args))
EOF
launch() {  # label, accelerate config[, recipe, arguments file, the student file a checkpoint must hold]
  local label=$1 config=$2 recipe=${3:-recipes/sd15-dmd2-1step.yaml} argfile=${4:-$WORK/tiny-args.txt}
  local weights=${5:-diffusion_pytorch_model.safetensors} limit=${6:-50} run="$WORK/run-$1"
  mapfile -t args < <(sed "s#$WORK/RUN#$run#" "$argfile")
  if timeout "$limit" accelerate launch --config_file "$config" --num_processes 1 -m distill.train \
      "$recipe" "${args[@]}" > "$OUT/$label.log" 2>&1 \
      && ls "$run"/checkpoints/*/student/"$weights" > /dev/null 2>&1; then
    row "$label (accelerate launch, 1 GPU)" pass "2 steps, checkpoint student/ written; $(tail -1 "$run/times.jsonl" | cut -c1-120)"
  else
    row "$label (accelerate launch, 1 GPU)" FAIL "see $label.log: $(grep -m1 -E 'Error|error' "$OUT/$label.log" | cut -c1-160)"
  fi
}
launch fsdp2 configs/accelerate/fsdp2.yaml
launch fsdp2-lora configs/accelerate/fsdp2.yaml recipes/sd15-dmd2-4step-lora.yaml "$WORK/tiny-lora-args.txt" adapter_model.safetensors 60
if python -c "import deepspeed" 2> /dev/null; then
  launch zero2 configs/accelerate/deepspeed-zero2.yaml
else
  row "zero2 (accelerate launch, 1 GPU)" skipped "deepspeed not installed (pip install -e '.[deepspeed]')"
fi

# ---- approximated R1 under bf16 / fp16 / fp32
python - <<'EOF' >> "$TABLE" 2> "$OUT/r1.log" || row "approximated R1" FAIL "see r1.log"
import torch
from distill.methods.common import regularised_inputs, regularised_penalty, regulariser_context

torch.manual_seed(0)
disc = torch.nn.Sequential(torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(64, 64, 3, padding=1),
                           torch.nn.SiLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 1)).cuda()
real, fake = torch.randn(8, 4, 64, 64, device="cuda"), torch.randn(8, 4, 64, 64, device="cuda")
for dtype in ("float32", "bfloat16", "float16"):
    values = {}
    for mode in ("distill", "autocast"):
        inputs = regularised_inputs("approximated", fake, real, 0.01, torch.Generator("cuda").manual_seed(1))
        with torch.autocast("cuda", dtype=getattr(torch, dtype), enabled=dtype != "float32"):
            context = regulariser_context("approximated", "cuda") if mode == "distill" else torch.enable_grad()
            with context:
                logits = disc(torch.cat(inputs)).squeeze(1)
        penalty, _ = regularised_penalty("approximated", logits, inputs, 0.01, torch.Generator("cuda").manual_seed(2))
        values[mode] = penalty.item()
    print(f"| approximated R1, {dtype} | {values['distill']:.6g} | left to autocast: {values['autocast']:.6g} |")
EOF

row "total" "$(( $(date +%s) - started )) s" "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2> /dev/null)"
cat "$TABLE"
rm -rf "$WORK"
