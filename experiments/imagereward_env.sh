#!/usr/bin/env bash
# The isolated environment of the ImageReward metric (obsdiff/eval/image_reward.py), by default
# .venv-imagereward at the repository root; the main environment is left alone.
#
# image-reward 1.5 cannot be imported next to transformers 5: its BLIP text encoder
# (ImageReward/models/BLIP/med.py) imports apply_chunking_to_forward,
# find_pruneable_heads_and_indices and prune_linear_layer from transformers.modeling_utils, which
# re-exports them up to transformers 4.55.4 only (gone from 4.56.0 on). So this environment pins
# transformers 4.55.4, with image-reward's own pins (timm 0.6.13, fairscale 0.4.13) and
# clip-anytorch for the `import clip` of its package __init__ (the upstream requirement is
# OpenAI's CLIP from git, not on PyPI). The scores are read by `python <worker file>`, so obsdiff
# itself is not installed here.
#
#   bash experiments/imagereward_env.sh                      # or: make imagereward-env
#   IMAGEREWARD_VENV=/elsewhere PYTHON=python3.11 bash experiments/imagereward_env.sh
#   TORCH_SPEC="torch==... torchvision==... --index-url ..." bash experiments/imagereward_env.sh
#
# Then: eval.image_reward.enabled=true eval.image_reward.python=.venv-imagereward/bin/python
# The weights (ImageReward.pt, med_config.json, bert-base-uncased's tokenizer) are fetched from
# the Hugging Face Hub on first use; offline, pre-fill eval.image_reward.download_root and the
# Hub cache.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${IMAGEREWARD_VENV:-.venv-imagereward}
if [[ -z "${TORCH_SPEC:-}" ]]; then
    if [[ "$(uname -m)" == aarch64 ]]; then
        TORCH_SPEC="torch==2.9.1 torchvision==0.24.1"
    else
        TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
    fi
fi
PACKAGES=(
    "transformers==4.55.4"   # newest 4.x whose modeling_utils has what image-reward imports
    "image-reward==1.5"      # pins timm==0.6.13 and fairscale==0.4.13
    "clip-anytorch==2.6.0"   # provides the `clip` module image-reward imports
    "huggingface-hub<1.0"    # what transformers 4.55 accepts
    "diffusers==0.39.0"      # image-reward imports it; the newest that accepts huggingface-hub<1.0
    "setuptools<81"          # clip-anytorch imports pkg_resources (gone from newer setuptools)
)

start=$(date +%s)
if ! "$VENV/bin/python" -c "import sys" >/dev/null 2>&1; then
    echo ">> creating $VENV with $($PYTHON --version)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet)
echo ">> installing $TORCH_SPEC"
# shellcheck disable=SC2086  # TORCH_SPEC is a list of pip arguments
"${PIP[@]}" $TORCH_SPEC
echo ">> installing ${PACKAGES[*]}"
"${PIP[@]}" "${PACKAGES[@]}"

echo ">> checking: import ImageReward"
"$VENV/bin/python" - <<'EOF'
from importlib.metadata import version

import ImageReward  # noqa: F401

names = ["torch", "torchvision", "transformers", "image-reward", "timm", "fairscale", "clip-anytorch"]
print("   " + ", ".join(f"{name} {version(name)}" for name in names))
EOF
echo ">> $VENV ready in $(($(date +%s) - start)) s, $(du -sh "$VENV" | cut -f1)"
echo ">> use it with: eval.image_reward.enabled=true eval.image_reward.python=$VENV/bin/python"
