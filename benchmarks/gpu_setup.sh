# Sourced by a GPU script from the repository root, with NAME set (gpu_check.sh, gpu_packing.sh): what every call to the device
# machine needs first. Sets PY (the Python of $PYTHON, else python3), OUT (/tmp/$NAME unless given; what comes back),
# WORK (/tmp/${NAME}_work unless given; emptied), LOG ($OUT/$NAME.log) and PYTHONPATH (the repository, after the
# wheels of .whl when the call carried them: the project's pinned transformers and datasets for the GPU image's
# Python 3.12, see benchmarks/fetch_gpu_wheels.sh, installed into /tmp/site). Hub and datasets offline.
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OUT=${OUT:-/tmp/$NAME}
WORK=${WORK:-/tmp/${NAME}_work}
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"
LOG=$OUT/$NAME.log
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor_cache  # one compile cache for every process of the call
if ls .whl/*.whl >/dev/null 2>&1; then
  wheels=(.whl/*.whl)
  # datasets 5.2 needs pyarrow >= 24; with an older pyarrow on the image, datasets 5.0 (.whl/older).
  if ! $PY -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null \
      && ls .whl/older/datasets-*.whl >/dev/null 2>&1; then
    wheels=($(ls .whl/*.whl | grep -v /datasets-) .whl/older/datasets-*.whl)
  fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
