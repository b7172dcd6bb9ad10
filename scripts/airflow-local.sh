#!/usr/bin/env bash
# Airflow on this machine, with the repository's DAGs: `./exfm airflow-local [--postgres] [COMPONENT...]`.
# exfm puts the project's venv and this clone on the paths and sets AIRFLOW_HOME (./.airflow),
# the DAGs folder (./dags) and no example DAGs, then runs this script. It starts a Spark Connect
# server with Delta (`exfm spark-server`, port EXFM_SPARK_PORT, 15002) that every task connects to,
# then the api-server, scheduler, dag-processor and triggerer (or the COMPONENTs named) with the
# LocalExecutor, UI and API on 127.0.0.1 only (port EXFM_AIRFLOW_PORT, 8080); Ctrl-C stops all.
# The metadata DB is SQLite, or with --postgres a Postgres server of its own (Debian's
# postgresql; data in $AIRFLOW_HOME/postgres, port EXFM_POSTGRES_PORT, 15432, loopback only).
set -euo pipefail
port="${EXFM_AIRFLOW_PORT:-8080}"
spark_port="${EXFM_SPARK_PORT:-15002}"
postgres=false
if [ "${1:-}" = --postgres ]; then
  postgres=true
  shift
fi
components=("$@")
[ ${#components[@]} -gt 0 ] || components=(spark-server api-server scheduler dag-processor triggerer)
if [[ " ${components[*]} " == *" spark-server "* ]]; then
  # The tasks are thin clients of the one server: no driver JVM and no cold JIT per task.
  export EXFM__SPARK__REMOTE="sc://127.0.0.1:$spark_port"
fi

export AIRFLOW__CORE__EXECUTOR=LocalExecutor
# Two tasks at a time fill a small machine (the FM and VM tasks train torch in their own process),
# and SQLite has a single writer (the LocalExecutor on SQLite needs nothing else in Airflow 3).
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-2}"
export AIRFLOW__API__HOST=127.0.0.1 AIRFLOW__API__PORT="$port" AIRFLOW__API__WORKERS="${AIRFLOW__API__WORKERS:-1}"
export AIRFLOW__API__BASE_URL="http://127.0.0.1:$port"
# Tasks report to the api-server's execution API, whose default URL assumes port 8080.
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://127.0.0.1:$port/execution/"

mkdir -p "$AIRFLOW_HOME"
pids=() db_pid=""
stop() {
  trap - INT TERM EXIT
  echo "airflow-local: stopping ${components[*]}" >&2
  if [ ${#pids[@]} -gt 0 ]; then  # (a bare `wait` would wait for the DB too)
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  if [ -n "$db_pid" ]; then  # last: the components close their connections first
    kill -TERM "$db_pid" 2>/dev/null || true
    wait "$db_pid" 2>/dev/null || true
  fi
}
trap 'exit 130' INT TERM
trap stop EXIT
if $postgres; then
  # Started first and stopped last (db_pid); the password is generated once and kept in
  # $AIRFLOW_HOME/postgres.password (mode 600), never in the repository.
  bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
  [ -x "$bin/postgres" ] || { echo "airflow-local: --postgres needs Debian's postgresql (apt-get install postgresql)" >&2; exit 1; }
  pg_port="${EXFM_POSTGRES_PORT:-15432}" pgdata="$AIRFLOW_HOME/postgres" secret="$AIRFLOW_HOME/postgres.password"
  as_pg=()
  if [ "$(id -u)" = 0 ]; then  # the server refuses to run as root: it runs as the postgres user
    as_pg=(runuser -u postgres --)
    runuser -u postgres -- test -x "$AIRFLOW_HOME" || {
      echo "airflow-local: the postgres user cannot reach $AIRFLOW_HOME (every parent directory needs o+x)" >&2
      exit 1
    }
  fi
  [ -s "$secret" ] || (umask 077 && python -c 'import secrets; print(secrets.token_urlsafe(24))' >"$secret")
  if [ ! -f "$pgdata/PG_VERSION" ]; then
    mkdir -p "$pgdata"
    pwfile="$(mktemp)"
    cp "$secret" "$pwfile"
    if [ ${#as_pg[@]} -gt 0 ]; then chown postgres "$pgdata" "$pwfile"; fi
    "${as_pg[@]}" "$bin/initdb" -D "$pgdata" -U airflow --pwfile="$pwfile" --auth=scram-sha-256 -E UTF8 \
      >"$AIRFLOW_HOME/postgres-init.log" 2>&1 || { rm -f "$pwfile"; cat "$AIRFLOW_HOME/postgres-init.log" >&2; exit 1; }
    rm -f "$pwfile"
  fi
  "${as_pg[@]}" "$bin/postgres" -D "$pgdata" -p "$pg_port" -c listen_addresses=127.0.0.1 -k "$pgdata" \
    >"$AIRFLOW_HOME/postgres.log" 2>&1 &
  db_pid="$!"
  export PGPASSWORD="$(cat "$secret")"
  for _ in $(seq 60); do
    "$bin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" && break
    kill -0 "$db_pid" 2>/dev/null || { echo "airflow-local: postgres died; see $AIRFLOW_HOME/postgres.log" >&2; exit 1; }
    sleep 1
  done
  "$bin/psql" -h 127.0.0.1 -p "$pg_port" -U airflow -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'airflow'" \
    | grep -q 1 || "$bin/createdb" -h 127.0.0.1 -p "$pg_port" -U airflow airflow
  url="$AIRFLOW_HOME/postgres.url"
  (umask 077 && printf %s "postgresql+psycopg2://airflow:$PGPASSWORD@127.0.0.1:$pg_port/airflow" >"$url")  # no newline: _cmd keeps it
  unset PGPASSWORD
  export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD="cat $url"
elif grep -q "^sql_alchemy_conn_cmd = cat $AIRFLOW_HOME/postgres.url" "$AIRFLOW_HOME/airflow.cfg" 2>/dev/null; then
  echo "airflow-local: $AIRFLOW_HOME keeps its metadata DB on Postgres: run with --postgres" >&2
  exit 2
fi
# Before the components start: the first run writes airflow.cfg with the JWT secret they must share.
# The DAG's tasks take a slot of the pool exfm_spark each (dags/exfm_daily.py): the Spark sessions
# this machine holds at once.
{ airflow db migrate && airflow pools set exfm_spark "${EXFM_SPARK_SLOTS:-2}" "Spark sessions at once"; } \
  >"$AIRFLOW_HOME/setup.log" 2>&1 || { cat "$AIRFLOW_HOME/setup.log" >&2; exit 1; }
if $postgres; then
  # `./exfm airflow ...` with this AIRFLOW_HOME (and no --postgres to tell it) must find the same
  # DB: airflow.cfg reads the URL from the 600 file instead of holding the password.
  sed -i "s|^sql_alchemy_conn = .*|sql_alchemy_conn_cmd = cat $url|" "$AIRFLOW_HOME/airflow.cfg"
fi

for c in "${components[@]}"; do
  case "$c" in
    spark-server)
      python -m jobs.cli spark-server --port "$spark_port" >"$AIRFLOW_HOME/$c.log" 2>&1 &
      pids+=("$!")
      for _ in $(seq 180); do  # up before any task tries to connect
        (exec 3<>"/dev/tcp/127.0.0.1/$spark_port") 2>/dev/null && break
        kill -0 "$!" 2>/dev/null || { echo "airflow-local: spark-server died; see $AIRFLOW_HOME/$c.log" >&2; exit 1; }
        sleep 1
      done
      continue ;;
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
      "and exfm_maintenance (weekly: VACUUM, retention, snapshot GC) the same way.\n"
      "Ctrl-C stops every component.\n", flush=True)
PY
fi
status=0
wait -n || status=$?
echo "airflow-local: a component stopped (status $status), so all stop; see $AIRFLOW_HOME/<component>.log" >&2
exit "$status"
