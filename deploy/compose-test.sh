#!/usr/bin/env bash
# End-to-end test of deploy/docker-compose.yml with podman-compose:
# build the images, bring up smtpguard + postfix + redis + prometheus on free
# loopback ports, send one message through smtpguard, check Postfix delivered
# it and Prometheus scraped smtpguard's counter, then tear everything down.
# Needs root and podman (bash ../shared/tools/container-setup.sh); traffic stays
# on loopback and the compose network.  Grafana (profile "grafana") is not started.
set -euo pipefail
cd "$(dirname "$0")/.."
PROJECT=${PROJECT:-smtpguard-ctest}
COMPOSE=(podman-compose -p "$PROJECT" -f deploy/docker-compose.yml)
SERVICES=(smtpguard postfix redis prometheus)
PY=${PYTHON:-python3}
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export SMTP_BIND=127.0.0.1 SMTP_PORT=${SMTP_PORT:-$(free_port)} PROMETHEUS_PORT=${PROMETHEUS_PORT:-$(free_port)}
export BUILDAH_FORMAT=docker  # keep the images' HEALTHCHECKs
log() { printf '[compose-test] %s\n' "$*" >&2; }

teardown() {
  status=$?
  if [ "$status" != 0 ]; then
    log "FAILED; container logs follow"
    for s in "${SERVICES[@]}"; do podman logs --tail 30 "${PROJECT}_${s}_1" 2>&1 | sed "s/^/[$s] /" >&2 || true; done
  fi
  log "tearing down"
  "${COMPOSE[@]}" down -v >/dev/null 2>&1 || true
  podman network rm "${PROJECT}_default" >/dev/null 2>&1 || true
  exit "$status"
}
trap teardown EXIT

# The base images must be here already (nothing is pulled in this lab); podman-compose's build
# returns 0 even when a podman build in it failed, so a missing base would only show up later
# as "container was not created".  Say so first, with the way to provide it.
for base in $(sed -n 's/^FROM[[:space:]]\{1,\}\([^[:space:]]*\).*/\1/p' deploy/Dockerfile deploy/*/Dockerfile | sort -u); do
  podman image exists "$base" || {
    log "base image $base is not available locally, and it cannot be pulled here:"
    log "  build it with: bash ../shared/tools/container-setup.sh (builds it from Debian packages),"
    log "  or load a saved copy: podman load -i FILE.tar && podman tag IMAGE $base"
    exit 1
  }
done

log "building images (SMTP on 127.0.0.1:$SMTP_PORT, Prometheus on 127.0.0.1:$PROMETHEUS_PORT)"
built=$(mktemp) out=$(mktemp)
build_failed() {  # the build's own error lines, not just the tail of its output
  log "$1; the build said:"
  grep -iE '^(error|Error:)|: error|failed|no such|not found|unable to' "$built" | tail -20 >&2 || true
  log "(last lines of the build output)"; tail -15 "$built" >&2
  exit 1
}
"${COMPOSE[@]}" build "${SERVICES[@]}" >"$built" 2>&1 || build_failed "podman-compose build failed"
# podman-compose build exits 0 when a podman build in it failed: look for the errors themselves.
! grep -qE '^Error: |exit code: [1-9]|returned non-zero' "$built" || build_failed "an image build failed"
"${COMPOSE[@]}" up -d --no-build "${SERVICES[@]}" >"$out" 2>&1 || { tail -30 "$out" >&2; exit 1; }
for s in "${SERVICES[@]}"; do
  podman container exists "${PROJECT}_${s}_1" || { log "container for $s was not created:"; tail -30 "$out" >&2
    build_failed "no container for $s"; }
done
rm -f "$out" "$built"

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq 1 "$limit"); do "$@" >/dev/null 2>&1 && { log "ok: $what"; return 0; }; sleep 1; done
  log "timed out after ${limit}s: $what"; return 1
}
ready() { podman exec "${PROJECT}_smtpguard_1" /opt/smtpguard/bin/python -c \
  "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9125/readyz', timeout=3)"; }
wait_for 120 "smtpguard /readyz (Postfix and Redis reachable)" ready

log "sending a message through smtpguard"
"$PY" - "$SMTP_PORT" <<'PYEOF'
import smtplib, sys
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30) as c:
    c.ehlo("client.compose-test.example")
    c.sendmail("alice@sender.example", ["bob@example.test"],
               b"Subject: compose-test\r\nMessage-ID: <compose-test@sender.example>\r\n\r\nthrough smtpguard\r\n")
PYEOF

delivered() { podman exec "${PROJECT}_postfix_1" sh -c 'grep -l "^Subject: compose-test" /var/mail/vhosts/inbox/new/*'; }
wait_for 60 "Postfix delivered the message to /var/mail/vhosts/inbox/new" delivered
podman exec "${PROJECT}_postfix_1" sh -c 'cat /var/mail/vhosts/inbox/new/*' | grep -q "^Received: from client.compose-test.example" \
  || { log "the delivered message lacks the real client's Received: line (XCLIENT)"; exit 1; }
log "ok: Received: line names the real client (XCLIENT from smtpguard)"

curl_prom() { "$PY" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "http://127.0.0.1:$PROMETHEUS_PORT$1"; }
query() {  # query EXPR EXPECTED
  "$PY" - "$PROMETHEUS_PORT" "$1" "$2" <<'PYEOF'
import json, sys, urllib.parse, urllib.request
port, expr, expected = sys.argv[1:]
url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
result = json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]
sys.exit(0 if result and result[0]["value"][1] == expected else 1)
PYEOF
}
# Postfix: not published on the host, and XCLIENT refused to anyone but smtpguard
[ -z "$(podman port "${PROJECT}_postfix_1")" ] || { log "postfix has published ports"; exit 1; }
podman exec "${PROJECT}_redis_1" bash -c 'exec 3<>/dev/tcp/postfix/25; printf "EHLO other.example\r\nXCLIENT ADDR=192.0.2.1\r\nQUIT\r\n" >&3; cat <&3' \
  | grep -q "^550 5.7.0 Error: insufficient authorization" \
  || { log "Postfix accepted XCLIENT from the redis container"; exit 1; }
log "ok: Postfix is not published and refuses XCLIENT from another container"

rules() { curl_prom /api/v1/rules | grep -q '"name":"smtpguard"'; }
wait_for 30 "Prometheus loaded the smtpguard alerting rules" rules
wait_for 90 'Prometheus scrapes smtpguard: up{job="smtpguard"} == 1' query 'up{job="smtpguard"}' 1
wait_for 60 "Prometheus has smtpguard_relayed_messages_total == 1" query 'sum(smtpguard_relayed_messages_total)' 1
log "PASS"
