#!/usr/bin/env bash
# Fetch, on this (networked) machine, the wheels the GPU image lacks for Python 3.12 into .whl/ (git-ignored);
# benchmarks/gpu_check.sh installs them there when the device call carries ".whl". About 15 MB.
# fsspec 2026.9.0 is the newest both datasets versions below run with here (5.2 declares fsspec<=2026.9.0).
# Two datasets versions: 5.2.0 (the project's pin) needs pyarrow >= 24, whose presence on the image is not known
# here; 5.0.0 works with pyarrow >= 21 (the whole test suite passes with it and pyarrow 21). gpu_check.sh installs
# the one the image's pyarrow allows.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl \
    transformers==5.24.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
mkdir -p .whl/older
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any -d .whl/older \
    datasets==5.0.0
ls -la .whl
