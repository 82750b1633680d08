#!/usr/bin/env bash
# A local Argilla 2.8 server for katdata's review round trip, on 127.0.0.1 only.
#
#   annotation/server.sh start|stop|status|venv [--dir DIR] [--port N] [--es-port N] [--redis-port N]
#
# - `venv` (and `start`, on first use) creates .venv-argilla in the repo root with argilla-server
#   2.8.0 and the pins it needs apart from katdata's own venv (click 8.1.8, huggingface-hub<1.0,
#   datasets<4), plus noida-db, which stands in for Elasticsearch and Redis.
# - Everything the server writes lives under DIR (default: .argilla/ in the repo root): the SQLite
#   database, noida-db's data, logs, PID files and the owner's credentials (mode 600).
# - The owner user is `argilla` (workspace `argilla`); its API key is $ARGILLA_API_KEY when set on
#   the first start, else a random one saved to DIR/api_key; its UI password is in DIR/password.
# - `stop` ends the two processes by the PIDs it saved, nothing else.
# Environment: ARGILLA_SERVER_DIR, ARGILLA_PORT, ARGILLA_ES_PORT, ARGILLA_REDIS_PORT,
# ARGILLA_VENV (default .venv-argilla), PYTHON (the interpreter for the venv, default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ARGILLA_VENV:-$ROOT/.venv-argilla}"
DIR="${ARGILLA_SERVER_DIR:-$ROOT/.argilla}"
PORT="${ARGILLA_PORT:-6900}"
ES_PORT="${ARGILLA_ES_PORT:-9201}"
REDIS_PORT="${ARGILLA_REDIS_PORT:-6380}"
READY_TIMEOUT="${ARGILLA_READY_TIMEOUT:-120}"
PINS=("argilla-server==2.8.0" "click==8.1.8" "huggingface-hub<1.0" "datasets<4" "noida-db==0.2.3")

cmd="${1:-}"; shift || true
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --es-port) ES_PORT="$2"; shift 2 ;;
    --redis-port) REDIS_PORT="$2"; shift 2 ;;
    *) echo "server.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"

say() { echo "server.sh: $*" >&2; }

# Run a command in the background in its own session; PIDFILE gets the PID of the command itself
# (setsid may fork, so the PID is written from inside, just before exec).
spawn() {  # PIDFILE LOG CMD...
  local pidfile="$1" log="$2"; shift 2
  rm -f "$pidfile"
  setsid sh -c 'echo $$ > "$0"; exec "$@"' "$pidfile" "$@" >"$log" 2>&1 < /dev/null &
  for _ in $(seq 1 50); do [ -s "$pidfile" ] && return 0; sleep 0.1; done
  say "could not start $1"; return 1
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

ensure_venv() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import argilla_server, noida_db" 2>/dev/null; then
    return
  fi
  say "creating $VENV (argilla-server 2.8.0 + pins + noida-db; about 30-90 s)"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PINS[@]}" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$VENV/bin/python" -c "import argilla_server, noida_db" || { say "installing argilla-server failed"; exit 1; }
}

noida_bin() {
  "$VENV/bin/python" -c "import noida_db, os; print(os.path.join(os.path.dirname(noida_db.__file__), 'noida-db'))"
}

wait_http() {  # URL SECONDS PIDFILE
  local url="$1" limit="$2" pidfile="$3" t0=$SECONDS
  while [ $((SECONDS - t0)) -lt "$limit" ]; do
    if curl -s -o /dev/null -m 2 -w "%{http_code}" "$url" 2>/dev/null | grep -q "^200$"; then return 0; fi
    alive "$pidfile" || return 1
    sleep 0.3
  done
  return 1
}

server_env() {
  export ARGILLA_HOME_PATH="$DIR/home"
  export ARGILLA_DATABASE_URL="sqlite+aiosqlite:///$DIR/argilla.db?check_same_thread=False"
  export ARGILLA_SEARCH_ENGINE=elasticsearch
  export ARGILLA_ELASTICSEARCH="http://127.0.0.1:$ES_PORT"
  export ARGILLA_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
  export ARGILLA_ENABLE_TELEMETRY=0 HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1
  export ARGILLA_SHOW_HUGGINGFACE_SPACE_PERSISTENT_STORAGE_WARNING=false
}

credentials() {
  umask 077
  if [ ! -s "$DIR/api_key" ]; then
    if [ -n "${ARGILLA_API_KEY:-}" ]; then printf '%s' "$ARGILLA_API_KEY" > "$DIR/api_key"
    else "$VENV/bin/python" -c "import secrets; print('katdata.' + secrets.token_urlsafe(24), end='')" > "$DIR/api_key"; fi
  fi
  if [ ! -s "$DIR/password" ]; then
    "$VENV/bin/python" -c "import secrets; print(secrets.token_urlsafe(12), end='')" > "$DIR/password"
  fi
}

start() {
  local t0=$SECONDS
  if alive "$DIR/argilla.pid"; then say "already running (pid $(cat "$DIR/argilla.pid"))"; status; return 0; fi
  for p in "$PORT" "$ES_PORT" "$REDIS_PORT"; do
    if port_busy "$p" && ! alive "$DIR/noida.pid"; then say "port $p on 127.0.0.1 is already in use"; exit 1; fi
  done
  ensure_venv
  credentials
  if ! alive "$DIR/noida.pid"; then
    mkdir -p "$DIR/noida"
    spawn "$DIR/noida.pid" "$DIR/noida.log" "$(noida_bin)" start --data-dir "$DIR/noida" --host 127.0.0.1 \
      --only elasticsearch,redis --elasticsearch-port "$ES_PORT" --redis-port "$REDIS_PORT"
  fi
  if ! wait_http "http://127.0.0.1:$ES_PORT/" 30 "$DIR/noida.pid"; then
    say "noida-db did not answer on 127.0.0.1:$ES_PORT; its log:"; tail -20 "$DIR/noida.log" >&2; stop; exit 1
  fi
  server_env
  ( cd "$DIR" && "$VENV/bin/python" -m argilla_server database migrate >"$DIR/migrate.log" 2>&1 ) || {
    say "database migration failed:"; tail -20 "$DIR/migrate.log" >&2; stop; exit 1; }
  # The owner user, created from Python so the key never appears on a command line or in a log.
  KATDATA_KEY="$(cat "$DIR/api_key")" KATDATA_PW="$(cat "$DIR/password")" "$VENV/bin/python" -c "
import asyncio, os
from argilla_server.cli.database.users.create_default import _create_default
asyncio.run(_create_default(os.environ['KATDATA_KEY'], os.environ['KATDATA_PW'], True))
" >>"$DIR/migrate.log" 2>&1 || { say "creating the owner user failed:"; tail -20 "$DIR/migrate.log" >&2; stop; exit 1; }
  ( cd "$DIR" && spawn "$DIR/argilla.pid" "$DIR/argilla.log" \
      "$VENV/bin/python" "$ROOT/annotation/argilla_launch.py" --host 127.0.0.1 --port "$PORT" )
  if ! wait_http "http://127.0.0.1:$PORT/api/v1/version" "$READY_TIMEOUT" "$DIR/argilla.pid"; then
    say "argilla-server did not become ready on 127.0.0.1:$PORT; its log:"; tail -30 "$DIR/argilla.log" >&2
    stop; exit 1
  fi
  echo "$PORT" > "$DIR/port"
  say "ready in $((SECONDS - t0)) s: http://127.0.0.1:$PORT (user argilla, API key in $DIR/api_key)"
  echo "http://127.0.0.1:$PORT"
}

stop_one() {  # PIDFILE NAME
  local pidfile="$1" name="$2" pid
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      say "$name (pid $pid) ignored TERM for 5 s, killing it"; kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    say "stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
}

stop() {
  stop_one "$DIR/argilla.pid" argilla-server
  stop_one "$DIR/noida.pid" noida-db
}

status() {
  local rc=0
  for name in argilla noida; do
    if alive "$DIR/$name.pid"; then echo "$name: running (pid $(cat "$DIR/$name.pid"))"; else echo "$name: stopped"; rc=3; fi
  done
  if [ $rc -eq 0 ]; then
    echo "version: $(curl -s -m 2 "http://127.0.0.1:$(cat "$DIR/port" 2>/dev/null || echo "$PORT")/api/v1/version" || echo '?')"
  fi
  return $rc
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  venv) ensure_venv ;;
  *) echo "usage: $0 start|stop|status|venv [--dir DIR] [--port N] [--es-port N] [--redis-port N]" >&2; exit 2 ;;
esac
