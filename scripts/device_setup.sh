#!/bin/bash
# The lent GPU machine (the `device` tool) has jax[cuda], flax, torch and an older transformers
# installed but no network. This fetches, on a machine with the package index, the wheels it lacks
# (its python is 3.12), and installs them there without the index.
#
#   bash scripts/device_setup.sh download        # here: writes .whl/ (list it in .git/info/exclude)
#   source scripts/device_setup.sh install       # on the GPU machine, with .whl carried: PYTHONPATH set
#
# Then, in the same command on the GPU machine (one call, about 10 minutes):
#   python scripts/bench_gpu.py --layers 8 --json $OUT/bench_gpu.json
# Its jax (0.11.x) and flax stay the image's: do not carry the 0.10 / 0.12.8 wheels there.

WHEELS=(grain==0.2.18 array_record==0.8.6 optax==0.2.8 orbax-checkpoint==0.12.8 portpicker==1.6.0
        transformers==5.23.0)

case "$1" in
  download)
    mkdir -p .whl
    ${PIP:-python3 -m pip} download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}" && ls .whl
    ;;
  install)
    rm -rf /tmp/site  # a stale target folder makes pip --target keep old copies
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      || { echo "device_setup: wheel install failed" >&2; return 1 2>/dev/null || exit 1; }
    export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
    nvidia-smi -L
    python3 -c "import jax, flax, transformers, torch; print('jax', jax.__version__, jax.devices(), 'flax',
flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
    ;;
  *)
    echo "usage: bash scripts/device_setup.sh download | source scripts/device_setup.sh install" >&2
    return 2 2>/dev/null || exit 2
    ;;
esac
