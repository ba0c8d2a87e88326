#!/usr/bin/env bash
# Start a local Prefect server on loopback (schedules need one; the ephemeral mode does not run them).
#   infra/prefect_server.sh            then: export PREFECT_API_URL=http://127.0.0.1:4200/api
set -euo pipefail
cd "$(dirname "$0")/.."
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.fedhq/prefect-server}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/prefect server start --host "${FEDHQ_BIND:-127.0.0.1}" --port "${PREFECT_PORT:-4200}"
