#!/usr/bin/env bash
# Airflow on this machine, with the repository's DAGs: `./exfm airflow-local [COMPONENT...]`.
# exfm puts the project's venv and this clone on the paths and sets AIRFLOW_HOME (./.airflow),
# the DAGs folder (./dags) and no example DAGs, then runs this script. It starts the api-server,
# scheduler, dag-processor and triggerer (or the COMPONENTs named) on SQLite with the
# LocalExecutor, UI and API on 127.0.0.1 only (port EXFM_AIRFLOW_PORT, 8080); Ctrl-C stops all.
set -euo pipefail
port="${EXFM_AIRFLOW_PORT:-8080}"
components=("$@")
[ ${#components[@]} -gt 0 ] || components=(api-server scheduler dag-processor triggerer)

export AIRFLOW__CORE__EXECUTOR=LocalExecutor
# Every task starts its own Spark JVM: two at a time fill a small machine, and SQLite has a single
# writer (the LocalExecutor on SQLite needs nothing else in Airflow 3).
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-2}"
export AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT="$port" AIRFLOW__API__WORKERS="${AIRFLOW__API__WORKERS:-1}"
export AIRFLOW__API__BASE_URL="http://127.0.0.1:$port"
# Tasks report to the api-server's execution API, whose default URL assumes port 8080.
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://127.0.0.1:$port/execution/"

mkdir -p "$AIRFLOW_HOME"
# Before the components start: the first run writes airflow.cfg with the JWT secret they must share.
# The DAG's tasks take a slot of the pool exfm_spark each (dags/exfm_daily.py): the Spark sessions
# this machine holds at once.
{ airflow db migrate && airflow pools set exfm_spark "${EXFM_SPARK_SLOTS:-2}" "Spark sessions at once"; } \
  >"$AIRFLOW_HOME/setup.log" 2>&1 || { cat "$AIRFLOW_HOME/setup.log" >&2; exit 1; }

pids=()
stop() {
  trap - INT TERM EXIT
  echo "airflow-local: stopping ${components[*]}" >&2
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait || true
}
trap 'exit 130' INT TERM
trap stop EXIT
for c in "${components[@]}"; do
  case "$c" in
    # --skip-serve-logs: the log server binds every interface; the api-server reads the files.
    scheduler | triggerer) airflow "$c" --skip-serve-logs >"$AIRFLOW_HOME/$c.log" 2>&1 & ;;
    api-server | dag-processor) airflow "$c" >"$AIRFLOW_HOME/$c.log" 2>&1 & ;;
    *) echo "airflow-local: unknown component $c" >&2; exit 2 ;;
  esac
  pids+=("$!")
done
echo "airflow-local: ${components[*]} started; their output is in $AIRFLOW_HOME/<component>.log" >&2

if [[ " ${components[*]} " == *" api-server "* ]]; then
  python - "$port" "$AIRFLOW_HOME" <<'PY'
import json, pathlib, sys, time, urllib.request
port, home = sys.argv[1], pathlib.Path(sys.argv[2])
for _ in range(180):  # the api-server takes a while to import everything
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=2)
        break
    except OSError:
        time.sleep(1)
else:
    sys.exit(f"airflow-local: no api-server on port {port} after 3 minutes; see {home}/api-server.log")
passwords = home / "simple_auth_manager_passwords.json.generated"
login = ", ".join(f"user {u} password {p}" for u, p in json.loads(passwords.read_text()).items()) \
    if passwords.exists() else "no login needed"
print(f"\nAirflow: http://127.0.0.1:{port}  ({login}; the passwords are kept in {passwords})\n"
      "DAGs are paused when they first appear: unpause exfm_daily in the UI or with\n"
      "  ./exfm airflow dags unpause exfm_daily    (with the same AIRFLOW_HOME)\n"
      "Ctrl-C stops every component.\n", flush=True)
PY
fi
status=0
wait -n || status=$?
echo "airflow-local: a component stopped (status $status), so all stop; see $AIRFLOW_HOME/<component>.log" >&2
exit "$status"
