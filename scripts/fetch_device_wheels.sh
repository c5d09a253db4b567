#!/usr/bin/env bash
# Fetch the Jupyter stack (papermill, nbclient, nbconvert, ipykernel and their needs) as wheels for the
# GPU machine, which has torch/triton/numpy/matplotlib but no Jupyter and no network (Python 3.12, x86-64).
# Run here, in the repo root; the wheels land in .whl/ (git-ignored) and travel with `carry: [".whl"]`.
# On the GPU machine: source scripts/device_setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  plat+=(--platform "$p")
done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl papermill==2.7.0 nbclient nbformat nbconvert ipykernel jupyter_client
# Already on the GPU image (its own builds must win): drop our copies.
for pkg in attrs certifi charset_normalizer idna jinja2 markupsafe packaging psutil pygments python_dateutil \
           pyyaml requests six tqdm typing_extensions urllib3 PyYAML MarkupSafe Jinja2 Pygments; do
  rm -f .whl/"$pkg"-*.whl
done
# Optional at run time and the largest (10 MB): ipykernel runs without debugpy, IPython without jedi (parso
# is jedi's). Left out so the working tree plus .whl stays under the device tool's 64 MiB.
rm -f .whl/debugpy-*.whl .whl/jedi-*.whl .whl/parso-*.whl
du -sh .whl
