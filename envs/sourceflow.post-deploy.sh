#!/usr/bin/env bash
# Run by Snakemake once after it creates envs/sourceflow.yaml's environment (--sdm conda): clean-fid without
# its declared dependencies (torchvision would break diffusers beside the CPU/CUDA torch already installed).
set -euo pipefail
python -m pip install --no-deps "clean-fid==0.1.35"
