#!/usr/bin/env bash
# The CUDA target on a GPU host whose image has its own CUDA torch (the workplace's H100/H200
# machines: Python 3.12, torch 2.11+cu130, triton) and no network. Run from the repository
# root there, with the wheels of .whl/ beside it (prepared here by `benchmarks/cuda_on_device.sh
# --prepare`); writes its log and results under ${OUT:-benchmarks/results/cuda}.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--prepare" ]]; then
    # Pure-Python or abi3 wheels, and cp312 builds of the compiled ones; the image already has
    # numpy, safetensors, pyyaml, huggingface_hub (>= 1.31, what transformers 5.23 asks), ...
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl executorch==1.5.1 torchao==0.18.0 doit==0.37.0 pydantic==2.14.4 pydantic-core==2.50.5 \
        transformers==5.23.0 tokenizers==0.23.3 ruamel.yaml==0.19.1 pytorch-tokenizers==1.5.0 \
        cloudpickle==3.1.3 annotated-types==0.8.0 typing-inspection==0.4.5 kgb==7.3 expecttest==0.3.0 \
        parameterized==0.9.0
    exit
fi
OUT="${OUT:-benchmarks/results/cuda}"
manifests=("$@")
[[ ${#manifests[@]} -gt 0 ]] || manifests=(benchmarks/cuda/qwen3-tiny-cuda.yaml benchmarks/cuda/qwen3-tiny-cuda-fp32.yaml)
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
# mlxbuild itself, for its doit entry points (`build`); pyproject asks for Python 3.11, the
# image has 3.12.
python3 -m pip install -q --no-index --no-deps --no-build-isolation --ignore-requires-python \
    --no-cache-dir --target /tmp/site . || exit
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
# The image's torch is the only CUDA torch there: accept it by name (the records name it).
export MLXBUILD_ACCEPT_UNTESTED=torch
export MLXBUILD_CACHE=/tmp/mlxbuild-cache MLXBUILD_ARTIFACTS=/tmp/mlxbuild-artifacts
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
    python3 -m mlxbuild.cli doctor
    time python3 -m mlxbuild.cli build --continue -v 2 --report "$OUT/report.json" \
        "${manifests[@]}"
    echo "build exit: $?"
} 2>&1 | tee "$OUT/log.txt"
# The CUDA artifacts' records come back beside the log (the .pte/.ptd files stay there).
python3 - "$OUT" <<'PY'
import json, shutil, sys
from pathlib import Path
for rec in Path("/tmp/mlxbuild-artifacts").rglob("*.json"):
    data = json.loads(rec.read_text())
    if isinstance(data, dict) and data.get("backend") == "cuda":
        shutil.copy(rec, sys.argv[1])
PY
# The CUDA tests (skipped on CPU hosts), on this GPU (RUN_TESTS=0 skips them).
if [[ "${RUN_TESTS:-1}" == 1 ]]; then
    python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest.txt"
fi
