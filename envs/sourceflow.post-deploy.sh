#!/usr/bin/env bash
# Run by Snakemake once after it creates envs/sourceflow.yaml's environment (--sdm conda): the packages of
# requirements-nodeps.txt without their declared dependencies (clean-fid's torchvision would break diffusers
# beside the CPU/CUDA torch already installed; the file says why).
set -euo pipefail
python -m pip install --no-deps -r "$(dirname "$0")/../requirements-nodeps.txt"
