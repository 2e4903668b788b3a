#!/usr/bin/env bash
# Prepare .gpu-check/ (git-ignored) for bench/gpu_check.py on a GPU machine that cannot download:
# the Python packages its image lacks, as wheels for CPython 3.12 on x86-64 Linux, and a Whisper
# folder's tokenizer and processor files (no weights: the check builds random-weight models).
#   bash bench/gpu_check_prepare.sh WHISPER_FOLDER [PYTHON]
set -euo pipefail
src=${1:?give a Whisper folder, e.g. one pulled with: batchalign-supervise models pull whisper-base}
py=${2:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/.gpu-check
mkdir -p "$out/whl" "$out/whisper-tokenizer"
for f in config.json generation_config.json preprocessor_config.json processor_config.json tokenizer.json \
         tokenizer_config.json vocab.json merges.txt normalizer.json added_tokens.json special_tokens_map.json; do
    [ -f "$src/$f" ] && cp "$src/$f" "$out/whisper-tokenizer/"
done
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in soundfile==0.13.1 soxr==1.0.0 structlog==25.4.0 cffi==2.0.0 pycparser==2.23; do
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${plat[@]}" -d "$out/whl" "$pkg"
done
ls -la "$out/whl" "$out/whisper-tokenizer"
