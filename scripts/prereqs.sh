# Sourced by the scripts beside it: installs what a fresh Debian machine with Rust lacks.

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Pingora's zlib-ng build needs cmake.
need_cmake() {
    if ! command -v cmake >/dev/null 2>&1; then
        echo "installing cmake (needed to build Pingora)…"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null
    fi
}

# The cluster-mode tests start real redis-server processes (Debian's redis-server package).
need_redis() {
    if ! command -v redis-server >/dev/null 2>&1; then
        echo "installing redis-server (needed by the cluster-mode tests)…"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    fi
}

# Python with venv support: Debian's python3 comes without it (python3-venv).
need_python_venv() {
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        echo "installing python3 and python3-venv (needed for the SDK suite)…"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    fi
}

# curl: the SDK suite runs the curl examples `tollgate demo` prints.
need_curl() {
    if ! command -v curl >/dev/null 2>&1; then
        echo "installing curl (the demo's printed examples use it)…"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null
    fi
}

# The official OpenAI and Anthropic Python SDKs for tests/sdk, and aiohttp for the
# deployed-model replica of tests/replica_aiohttp.py, in .venv.
need_sdk_venv() {
    if [ ! -x .venv/bin/python ]; then
        need_python_venv
        python3 -m venv .venv
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check -r tests/sdk/requirements.txt
}

target_dir() {
    echo "${CARGO_TARGET_DIR:-$PWD/target}"
}

# wrk and nginx for benches/nginx/run (benchmarks only: neither the tests nor CI need them).
need_bench_tools() {
    local missing=()
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    command -v nginx >/dev/null 2>&1 || missing+=(nginx)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing ${missing[*]} (needed by benches/nginx/run)…"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}
