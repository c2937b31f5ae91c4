#!/usr/bin/env bash
# Docker smoke test: builds the image, runs it read-only against the local Kore.ai sandbox and
# sees one deactivation succeed end to end. Not part of the default test run (it needs Docker and
# root); run it before changing the Dockerfile:
#
#   bash tests/docker/smoke.sh                     # base image from ../shared/tools/docker-base-image.sh
#   BASE_IMAGE=python:3.12-slim bash tests/docker/smoke.sh   # any base image Docker can pull
#
# Checks: the image builds; the container runs as uid 10001 with --read-only and no /tmp mount;
# the HEALTHCHECK turns healthy, probing the admin listener (server.admin_listen); /readyz is 200
# on both addresses and /metrics only on the admin one; a deactivation through the gateway
# answers 200 and reaches the sandbox; the mounted audit volume holds requested + completed
# records and the log file (logging.file); `audit verify` passes inside the image and on the
# host; nothing was written outside the volume; and `docker stop` drains and exits 0.
# Everything listens on 127.0.0.1 (host networking).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
IMAGE=${IMAGE:-kore-session-gateway:smoke}
PY=${PYTHON:-$REPO/.venv/bin/python}
NAME=kgw-smoke-$$
WORK=$(mktemp -d /tmp/kgw-smoke.XXXXXX)
SANDBOX_PID=

step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

cleanup() {
  local rc=$?
  if [ $rc -ne 0 ] && docker inspect "$NAME" >/dev/null 2>&1; then
    echo "-- container logs (last 40 lines):" >&2
    docker logs --tail 40 "$NAME" >&2 2>&1 || true
  fi
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  if [ -n "$SANDBOX_PID" ]; then kill "$SANDBOX_PID" 2>/dev/null || true; wait "$SANDBOX_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT

# Polls "$@" until it succeeds, at most $1 seconds.
wait_for() {
  local limit=$1; shift
  for _ in $(seq 1 $((limit * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  return 1
}

step "base image"
if [ -z "${BASE_IMAGE:-}" ]; then
  BASE_IMAGE=$(bash "${SHARED_TOOLS:-$REPO/../shared/tools}/docker-base-image.sh")
fi
docker info >/dev/null 2>&1 || fail "no Docker daemon answers"
ok "BASE_IMAGE=$BASE_IMAGE"

step "docker build"
start=$(date +%s)
docker build --quiet --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE" . >/dev/null
ok "built $IMAGE in $(( $(date +%s) - start )) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
[ "$user" = "10001:10001" ] || fail "image user is '$user', expected 10001:10001"
ok "image user $user, entrypoint $(docker image inspect -f '{{json .Config.Entrypoint}} {{json .Config.Cmd}}' "$IMAGE")"

step "sandbox on loopback"
# Three distinct ports below the ephemeral range (benchmarks/ports.py), from one process.
read -r SANDBOX_PORT GATEWAY_PORT ADMIN_PORT < <("$PY" -c \
  'from benchmarks.ports import free_port; print(*(free_port() for _ in range(3)))')
CLIENT_ID=cs-00000000-0000-4000-8000-0000000smoke
SECRET=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(32))')
KORE_SMOKE_SECRET=$SECRET "$REPO/.venv/bin/kore-gateway" sandbox --listen "127.0.0.1:$SANDBOX_PORT" \
  --client-id "$CLIENT_ID" --client-secret-env KORE_SMOKE_SECRET >"$WORK/sandbox.log" 2>&1 &
SANDBOX_PID=$!
wait_for 20 curl -fsS "http://127.0.0.1:$SANDBOX_PORT/__sandbox/stats" || fail "sandbox did not start"
ok "sandbox pid $SANDBOX_PID on 127.0.0.1:$SANDBOX_PORT"

step "config, secret and audit volume"
mkdir -p "$WORK/etc" "$WORK/secrets" "$WORK/data"
printf '%s\n' "$SECRET" >"$WORK/secrets/client_secret"
KEY=kgw_smoke_$("$PY" -c 'import secrets; print(secrets.token_hex(16))')
KEY_LINE=$(printf '%s\n' "$KEY" | "$REPO/.venv/bin/kore-gateway" hash-key --stdin)
cat >"$WORK/etc/gateway.toml" <<TOML
[server]
listen = "127.0.0.1:$GATEWAY_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
drain_s = 5

[upstream]
base_url = "http://127.0.0.1:$SANDBOX_PORT"
allow_insecure_http = true
timeout_s = 5

[audit]
path = "/var/lib/kore-gateway/audit/deactivations.jsonl"

[logging]
format = "json"
file = "/var/lib/kore-gateway/log/gateway.jsonl"

[[apps]]
name = "smoke"
client_id = "$CLIENT_ID"
client_secret_file = "/run/secrets/kore/client_secret"
bots = ["st-*"]

[[callers]]
name = "smoke-caller"
$KEY_LINE
bots = ["st-smoke-*"]
TOML
# The container's user (10001) owns the volume and reads the secret, as fsGroup/defaultMode would.
chown 10001:10001 "$WORK/data" "$WORK/secrets/client_secret"
chmod 0700 "$WORK/data"; chmod 0400 "$WORK/secrets/client_secret"; chmod 0644 "$WORK/etc/gateway.toml"
ok "gateway 127.0.0.1:$GATEWAY_PORT, admin 127.0.0.1:$ADMIN_PORT, audit volume $WORK/data"

step "docker run --read-only --network host"
docker run -d --name "$NAME" --read-only --network host --health-interval 1s \
  -v "$WORK/etc/gateway.toml:/etc/kore-gateway/gateway.toml:ro" \
  -v "$WORK/secrets:/run/secrets/kore:ro" \
  -v "$WORK/data:/var/lib/kore-gateway" \
  "$IMAGE" >/dev/null
health() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$NAME")" = healthy ]; }
wait_for 60 health || fail "container not healthy: $(docker inspect -f '{{json .State.Health}}' "$NAME")"
hc=$(docker inspect -f '{{(index .State.Health.Log 0).Output}}' "$NAME" | tr -d '\n')
case "$hc" in *"127.0.0.1:$ADMIN_PORT/healthz"*) ;; *) fail "HEALTHCHECK did not probe the admin address: $hc" ;; esac
ok "HEALTHCHECK on the admin address: $hc"
ok "running as uid $(docker exec "$NAME" id -u), root filesystem read-only: $(docker inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$NAME")"
curl -fsS "http://127.0.0.1:$GATEWAY_PORT/readyz" >"$WORK/readyz.json" || fail "/readyz not 200: $(cat "$WORK/readyz.json")"
ok "/readyz 200 $(cat "$WORK/readyz.json")"
curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null || fail "/readyz not 200 on the admin address"
curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" | grep -q '^kore_gateway_requests_total' \
  || fail "/metrics not served on the admin address"
status=$(curl -sS -o /dev/null -w '%{http_code}' "http://127.0.0.1:$GATEWAY_PORT/metrics")
[ "$status" = 404 ] || fail "/metrics on the API address: expected 404, got $status"
ok "/metrics on the admin address only (API address: 404)"
ok "probe by path, port from the mounted config: $(docker exec "$NAME" python -m gateway.http.healthcheck /readyz | cut -c1-60)…"

step "deactivation through the container"
status=$(curl -sS -o "$WORK/resp.json" -w '%{http_code}' -X POST \
  "http://127.0.0.1:$GATEWAY_PORT/v1/bots/st-smoke-bot/sessions/deactivate" \
  -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' -H 'X-Request-ID: smoke-1' \
  -d '{"userId": "u-smoke-1", "channel": "rtm"}')
echo "HTTP $status $(cat "$WORK/resp.json")"
[ "$status" = 200 ] || fail "expected 200, got $status"
grep -q '"success": *true' "$WORK/resp.json" || fail "no success:true in the answer"
calls=$(curl -fsS "http://127.0.0.1:$SANDBOX_PORT/__sandbox/calls")
"$PY" - "$calls" <<'PYCHECK' || fail "the sandbox did not see exactly one verified PUT"
import json, sys
[call] = json.loads(sys.argv[1])
assert call["status"] == 200 and call["claims"] is not None, call["status"]
assert "authorization" not in {k.lower() for k in call["headers"]}, "caller header forwarded"
print("sandbox saw:", call["method"], call["path"], json.dumps(call["body"]),
      "appId=" + call["claims"]["appId"], "->", call["status"])
PYCHECK
ok "200 success, and the sandbox verified the JWT signed with the mounted secret"

step "audit volume"
AUDIT=$WORK/data/audit/deactivations.jsonl
[ -f "$AUDIT" ] || fail "no audit file at $AUDIT"
ls -ln "$WORK/data/audit"
"$PY" - "$AUDIT" "$SECRET" "$KEY" <<'PYCHECK' || fail "audit records are not as expected"
import json, sys
path, secret, key = sys.argv[1:]
text = open(path, encoding="utf-8").read()
assert secret not in text and key not in text, "a secret reached the audit log"
records = [json.loads(line) for line in text.splitlines()]
assert [r["event"] for r in records] == ["deactivate.requested", "deactivate.completed"], records
assert all(r["requestId"] == "smoke-1" for r in records)
assert records[1]["outcome"] == "success" and records[1]["status"] == 200
for r in records:
    print(r["seq"], r["event"], r["requestId"], r["caller"], r["botId"], r["userId"],
          r.get("outcome", "-"), r["hash"][:16] + "…")
PYCHECK
echo "in the image: $(docker run --rm --read-only --network none \
  -v "$WORK/data:/var/lib/kore-gateway:ro" "$IMAGE" \
  audit verify /var/lib/kore-gateway/audit/deactivations.jsonl)"
echo "on the host:  $("$REPO/.venv/bin/kore-gateway" audit verify "$AUDIT")"
ok "audit verify passes in the image and on the host"
grep -q '"gateway.listening"' "$WORK/data/log/gateway.jsonl" || fail "no log file on the volume"
ok "log file on the volume: $(wc -l <"$WORK/data/log/gateway.jsonl") line(s)"
# Docker itself adds the mount points (and their parents) to the container's layer; anything
# else in `docker diff` would be a write by the gateway outside its volumes.
mounts=$(docker inspect -f '{{range .Mounts}}{{.Destination}} {{end}}' "$NAME")
changes=$(docker diff "$NAME" | "$PY" -c '
import sys
from pathlib import PurePosixPath as P
mounts = [P(m) for m in sys.argv[1].split()]
allowed = {str(p) for m in mounts for p in (m, *m.parents)}
for line in sys.stdin:
    kind, path = line.split(maxsplit=1)
    if path.strip() not in allowed:
        print(line.strip())
' "$mounts")
[ -z "$changes" ] || fail "container wrote outside its volumes: $changes"
ok "docker diff: nothing but the mount points Docker made ($mounts)"
ok "memory in use: $(docker stats --no-stream --format '{{.MemUsage}}' "$NAME")"

step "docker stop drains and exits 0"
docker stop -t 30 "$NAME" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
[ "$code" = 0 ] || fail "exit code $code"
for event in gateway.draining gateway.stopped; do
  docker logs "$NAME" 2>&1 | grep -q "\"$event\"" || fail "no $event log line"
done
ok "exit code 0 after gateway.draining and gateway.stopped"
docker logs "$NAME" 2>&1 | grep -qF "$SECRET" && fail "the secret reached the container log"
ok "the secret is not in the container log"

printf '\nSMOKE OK\n'
