#!/bin/bash
# GPU checks in one run on a lent accelerator machine (its image has torch, not mmedit's pinned stack).
# Prepare here first (wheels of the pinned stack for Python 3.12, into the git-ignored .whl/):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux1_x86_64 -d .whl nnsight==0.8.1 transformers==5.23.0 huggingface_hub==2.4.0 \
#     httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 greenlet==3.5.6 pydantic==2.14.4 pydantic_core==2.50.5 \
#     typing-inspection==0.4.5 annotated-types==0.8.0 websocket-client==1.9.2 zstandard==0.25.0 nltk==3.10.4 \
#     num2words==0.5.14 defusedxml tokenizers==0.23.3
#   python3 -m pip wheel --no-deps -w .whl rouge-score==0.1.2 docopt==0.6.2
# then run `bash benchmarks/gpu_check.sh` there with .whl carried (about 8 minutes).
set -o pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail -5 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers, nnsight; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
timeout 330 python3 -m pytest tests/test_gpu.py tests/test_losses.py tests/test_trace_stats.py \
    "tests/test_device_map.py::test_gpu_map_with_cpu_offload" -q -p no:cacheprovider \
    -o addopts="" -x 2>&1 | grep -vE "[Ww]arning|warnings.warn" | tee "$OUT/gpu-tests.log" | tail -25
timeout 150 python3 benchmarks/trace_overhead.py --device cuda --quick 2>&1 | tee "$OUT/trace-gpu.log" | tail -15
timeout 60 python3 benchmarks/trace_overhead.py --device cuda --statistics-only 2>&1 | tee "$OUT/stats-gpu.log" | tail -8
