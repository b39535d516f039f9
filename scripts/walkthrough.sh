#!/usr/bin/env bash
# The README's walk-through, as written there: your model, your data (run from an empty folder,
# with the project's .venv active or chanprune on PATH).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
python "$HERE/make_digits_folder.py" digits
python "$HERE/train_folder_model.py" digits resnet18-digits.pth --model torchvision:resnet18 --size 32
chanprune prune --model torchvision:resnet18 --arch-kwargs '{"num_classes": 10}' --weights resnet18-digits.pth \
    --data digits --input-size 32 32 --speedup 2 --out r18-2x.safetensors --report r18-2x.json
chanprune eval --model r18-2x.safetensors --data digits
chanprune finetune --model r18-2x.safetensors --data digits --epochs 1 --out r18-2x-ft.safetensors
chanprune eval --model r18-2x-ft.safetensors --data digits
chanprune export --model r18-2x-ft.safetensors --out r18-2x-ft.onnx
