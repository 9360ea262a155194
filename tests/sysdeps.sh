#!/usr/bin/env bash
# Installs the system packages the test suite drives for real (Postfix,
# redis-server, dnsmasq, swaks, haproxy, pflogsumm, Prometheus' promtool, fail2ban, db5.3-util);
# with --bench also what only the benchmarks run (postgrey, bench/policy.py's reference).
# Only as root and only what is missing; otherwise says what it would need.
set -euo pipefail
need=()
if [ "${1:-}" = --bench ]; then
  [ -x /usr/sbin/postgrey ] || need+=(postgrey)
fi
command -v postfix >/dev/null || need+=(postfix)
command -v smtp-source >/dev/null || need+=(postfix)
command -v redis-server >/dev/null || need+=(redis-server)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v swaks >/dev/null || need+=(swaks)
command -v pflogsumm >/dev/null || need+=(pflogsumm)
command -v promtool >/dev/null || need+=(prometheus)
command -v prometheus >/dev/null || need+=(prometheus)
command -v fail2ban-regex >/dev/null || need+=(fail2ban)
command -v haproxy >/dev/null || need+=(haproxy)
command -v db5.3_dump >/dev/null || need+=(db5.3-util)  # postgrey state dumps (import-postgrey)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "tests/sysdeps.sh: not root; tests needing ${need[*]} will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
# No package's daemon starts during the install (invoke-rc.d asks policy-rc.d; 101: "not now"),
# unless the machine has a policy of its own.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The system Postfix is not wanted: the tests start private instances.
# Nor the system daemons of Postfix, HAProxy, Prometheus and fail2ban: the tests
# start their own instances on loopback (or use only fail2ban-regex).
for svc in postfix haproxy prometheus fail2ban; do
  if command -v systemctl >/dev/null && systemctl is-active -q "$svc" 2>/dev/null; then systemctl stop "$svc" || true; fi
done
# Nor the postgrey just installed, now or at boot: it would hold port 10023, smtpguard's policy
# service's default; bench/policy.py starts its own on a free loopback port.
if [[ " ${need[*]} " == *" postgrey "* ]] && command -v systemctl >/dev/null; then
  systemctl stop postgrey 2>/dev/null || true
  systemctl disable -q postgrey 2>/dev/null || true
fi
