#!/usr/bin/env bash
# Start (or stop) the local stack as long-lived services, all state under the data directory:
#   Prefect server on 127.0.0.1:4200, MLflow server on 127.0.0.1:5000, a Ray head node, and a process that
#   serves the deployments (train-family/b0-b7, ...) so `prefect deployment run` and the nightly schedule work.
# Usage: infra/local-stack.sh start|stop|status
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${EFFNET_DATA_DIR:-$PWD/data}"
BIN="$PWD/.venv/bin"
RUN="$DATA/run"
mkdir -p "$RUN" "$DATA/logs" "$DATA/mlflow/artifacts" "$DATA/prefect"
export PREFECT_HOME="$DATA/prefect" PREFECT_API_URL="http://127.0.0.1:4200/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_TRACKING_URI="http://127.0.0.1:5000"

start_one() {  # name, command...
  local name=$1; shift
  if [ -f "$RUN/$name.pid" ] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then
    echo "$name: already running (pid $(cat "$RUN/$name.pid"))"; return; fi
  nohup "$@" >"$DATA/logs/$name.log" 2>&1 &
  echo $! >"$RUN/$name.pid"; echo "$name: started (log $DATA/logs/$name.log)"
}

wait_http() {  # url, name
  for _ in $(seq 120); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "$2 did not come up; see $DATA/logs" >&2; exit 1
}

case "${1:-}" in
  start)
    start_one prefect "$BIN/prefect" server start --host 127.0.0.1 --port 4200
    start_one mlflow "$BIN/mlflow" server --backend-store-uri "sqlite:///$DATA/mlflow/mlflow.db" \
      --artifacts-destination "$DATA/mlflow/artifacts" --host 127.0.0.1 --port 5000
    "$BIN/ray" status >/dev/null 2>&1 || "$BIN/ray" start --head --include-dashboard=false --disable-usage-stats \
      >"$DATA/logs/ray.log" 2>&1 && echo "ray: head node up"
    wait_http http://127.0.0.1:4200/api/health prefect
    wait_http http://127.0.0.1:5000/health mlflow
    start_one serve "$BIN/effnet" serve
    echo "Prefect UI http://127.0.0.1:4200  MLflow UI http://127.0.0.1:5000"
    echo "export PREFECT_API_URL=$PREFECT_API_URL MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI"
    ;;
  stop)
    for name in serve mlflow prefect; do
      [ -f "$RUN/$name.pid" ] && kill "$(cat "$RUN/$name.pid")" 2>/dev/null && echo "$name: stopped"
      rm -f "$RUN/$name.pid"
    done
    "$BIN/ray" stop >/dev/null 2>&1 && echo "ray: stopped" || true
    ;;
  status)
    for name in prefect mlflow serve; do
      if [ -f "$RUN/$name.pid" ] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then echo "$name: running";
      else echo "$name: stopped"; fi
    done
    "$BIN/ray" status >/dev/null 2>&1 && echo "ray: running" || echo "ray: stopped"
    ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
