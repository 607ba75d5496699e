#!/usr/bin/env bash
# The wheels benchmarks/accelerator.py needs on a machine that has JAX, flax, optax, orbax,
# tensorstore, Pillow and tokenizers but not the rest of lladav-jax's dependencies (the lent
# GPU machine: Python 3.12, no package index). Both are pure Python; run from the repository
# root, here, once: they land in .whl/ (ignored), which the run carries.
set -euo pipefail
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform any -d .whl \
  "ml-collections==1.1.0" "qwix==0.1.8"
ls .whl
