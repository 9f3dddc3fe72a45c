#!/usr/bin/env bash
# Download, HERE (this machine has PyPI), the wheels the GPU device machine lacks into <repo>/.whl (git-ignored), for
# its Python 3.12 on manylinux x86_64. bench/gpu/run.sh installs them there into /tmp/site (no index, no deps).
#
# Why each one (the device image: Python 3.12, torch 2.11 + CUDA 13, triton 3.6, transformers 5.17, lightning /
# pytorch-lightning 2.6.6, peft, safetensors 0.8.0, tokenizers 0.23.2, huggingface_hub 1.33.0, accelerate 1.15,
# pyarrow, pandas, xxhash, fsspec, einops, typing-extensions, pyyaml, psutil; see the device tool's KINDS.md):
#   transformers 5.23.0      the parity reference (pyproject pins it); needs huggingface-hub>=1.31,<3 (1.33 there),
#                            tokenizers>=0.23.1,<0.24 (0.23.2 there), safetensors>=0.8 (0.8.0 there), regex>=2025.10.22
#   regex                    carried: transformers 5.23 needs >= 2025.10.22 and the image's version is unknown
#   flash-linear-attention   fla 0.6.0 (needs transformers>=5.6.2,<6) + fla-core 0.6.0 (needs einops, triton>=3.3,
#   fla-core                 torch>=2.7: all there): the Triton Gated DeltaNet chunk kernel and causal conv
#   datasets 5.2.0           the app's data path (absent there); needs dill<0.4.2 and multiprocess<0.70.20 (absent),
#   dill, multiprocess       fsspec<=2026.9.0 (carried, pinned: the image's may be newer), pyarrow>=24 (there; its
#   fsspec                   version is recorded by check.py's machine facts; a pyarrow wheel is ~40 MB, not carried)
#   jsonargparse 4.53.0      LightningCLI (absent there), with its [signatures] extra: docstring-parser, typeshed-client
#   docstring-parser, typeshed-client
#   lightning 2.6.6, peft 0.21.2   the project's pins (the image has them at an unknown / maybe other version)
# Not carried: causal-conv1d (sdist only, its build needs nvcc and downloads; the check reports which conv ran).
#
#   bash bench/gpu/build_wheels.sh        # ~19 MiB, prints the total; rerun any time (replaces .whl/)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DEST=.whl
WHEELS=(
  transformers==5.23.0
  regex==2026.11.19
  flash-linear-attention==0.6.0
  fla-core==0.6.0
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  fsspec==2026.9.0
  jsonargparse==4.53.0
  docstring-parser==0.18.0
  typeshed-client==2.15.0
  lightning==2.6.6
  peft==0.21.2
)
rm -rf "$DEST" && mkdir -p "$DEST"
out=$("$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}" 2>&1) \
  || { echo "$out" >&2; exit 1; }
echo "$out" | grep -v "is ignored: it is neither a file nor a directory" || true
# one version of each distribution, or the install there stops
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z' 'a-z' | sort | uniq -d)
if [ -n "$dupes" ]; then echo "two versions of: $dupes" >&2; exit 1; fi
count=$(ls "$DEST"/*.whl | wc -l)
if [ "$count" -ne "${#WHEELS[@]}" ]; then echo "expected ${#WHEELS[@]} wheels, got $count" >&2; exit 1; fi
# what they ask for (extras left out): every name must be carried or on the device image
for w in "$DEST"/*.whl; do
  reqs=$(unzip -p "$w" '*.dist-info/METADATA' | { grep '^Requires-Dist' || true; } | { grep -v 'extra ==' || true; } | cut -d' ' -f2- | tr '\n' ' ')
  echo "$(basename "$w"): ${reqs:-nothing}"
done
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total: $count wheels, $((total / 1024 / 1024)) MiB ($total bytes) in $DEST (the working tree that travels must stay < 64 MiB)"
