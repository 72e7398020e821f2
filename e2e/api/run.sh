#!/usr/bin/env bash
# The API against its own OpenAPI document, and the metrics against Prometheus' rules:
#   1. `openapi-spec-validator` on the document without auth (`gpuflow openapi`) and on the one
#      an engine with `auth.token` serves;
#   2. `/metrics` of a fresh engine through the official client's OpenMetrics parser
#      (`check_metrics.py`);
#   3. a bounded schemathesis run against a live engine (fixed seed, a few examples per
#      operation): no 5xx, every status, content type and body as documented.
#
#   bash e2e/api/run.sh [path/to/gpuflow]      (default: target/debug/gpuflow)
#
# Tools are pinned and installed into a virtual environment under target/ (PyPI).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$(realpath "${1:-${GPUFLOW_BIN:-$repo/target/debug/gpuflow}}")"
venv="$repo/target/api-venv"
SCHEMATHESIS=3.39.16
VALIDATOR=0.7.1
PROMETHEUS_CLIENT=0.21.1
# schemathesis 3's schema strategies need a hypothesis from before `many.more()` changed.
HYPOTHESIS=6.131.0
EXAMPLES="${API_MAX_EXAMPLES:-50}"

if ! "$venv/bin/python" -c "import schemathesis, openapi_spec_validator, prometheus_client, hypothesis as h; assert h.__version__ == '$HYPOTHESIS'" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "schemathesis==$SCHEMATHESIS" "openapi-spec-validator==$VALIDATOR" "prometheus-client==$PROMETHEUS_CLIENT" "hypothesis==$HYPOTHESIS"
fi

work="$(mktemp -d)"
engine_pid=""
cleanup() {
  if [ -n "$engine_pid" ]; then kill "$engine_pid" 2>/dev/null || true; wait "$engine_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

# Starts an engine on e2e/api/engine.yaml plus $1 (extra YAML); sets $base.
start_engine() {
  mkdir -p "$work/$2"
  { printf 'listen: 127.0.0.1:0\ndata_dir: %s\n' "$work/$2/data"; cat "$repo/e2e/api/engine.yaml"; printf '%s\n' "$1"; } >"$work/$2/gpuflow.yaml"
  "$bin" serve --config "$work/$2/gpuflow.yaml" >"$work/$2/engine.log" 2>&1 &
  engine_pid=$!
  for _ in $(seq 100); do
    if [ -s "$work/$2/data/listen.addr" ]; then
      base="http://$(cat "$work/$2/data/listen.addr")"
      curl -fsS "$base/healthz" >/dev/null 2>&1 && return 0
    fi
    sleep 0.1
  done
  echo "the engine did not start:"; cat "$work/$2/engine.log"; exit 1
}

stop_engine() {
  kill "$engine_pid"; wait "$engine_pid" 2>/dev/null || true; engine_pid=""
}

# schemathesis on the document at $1 against $base, $2 examples per operation, fixed seed.
# The live feed never ends by design; it has its own tests (integration `dashboard::`).
st_run() {
  local schema="$1" examples="$2"
  shift 2
  "$venv/bin/st" run "$schema" --base-url "$base" \
    --experimental=openapi-3.1 \
    --checks all \
    --data-generation-method all \
    --hypothesis-max-examples "$examples" \
    --hypothesis-seed 1 \
    --hypothesis-phases explicit,generate \
    --exclude-path /v1/events \
    --request-timeout 10000 \
    --no-color "$@"
}

echo "openapi-spec-validator: gpuflow openapi"
"$bin" openapi >"$work/openapi.json"
"$venv/bin/openapi-spec-validator" "$work/openapi.json"

token="api-check-token-0123456789"
start_engine "auth: {token: \"$token\"}" auth
echo "openapi-spec-validator: /openapi.json of an engine with auth"
curl -fsS -H "Authorization: Bearer $token" "$base/openapi.json" >"$work/openapi-auth.json"
"$venv/bin/openapi-spec-validator" "$work/openapi-auth.json"
echo "schemathesis against the engine with auth: the token is needed where documented, 401 otherwise"
st_run "$work/openapi-auth.json" 5 -H "Authorization: Bearer $token" \
  || { echo "schemathesis found problems (auth); the engine's log:"; tail -50 "$work/auth/engine.log"; exit 1; }
stop_engine

start_engine "" plain
echo "metrics of a fresh engine, read by the Prometheus client's OpenMetrics parser"
"$venv/bin/python" "$repo/e2e/api/check_metrics.py" "$base" quickstart prepare,infer "$repo/docs/pipelines.md"
echo "schemathesis $SCHEMATHESIS against $base ($EXAMPLES examples per operation, seed 1)"
st_run "$base/openapi.json" "$EXAMPLES" \
  || { echo "schemathesis found problems; the engine's log:"; tail -50 "$work/plain/engine.log"; exit 1; }
curl -fsS "$base/healthz" >/dev/null || { echo "the engine stopped answering:"; tail -50 "$work/plain/engine.log"; exit 1; }
echo "API conformance: passed"
