#!/bin/bash
# Configure and run the backend Postfix in the foreground.
#   MYHOSTNAME    Postfix's myhostname             (default mx.example.test)
#   MAIL_DOMAINS  domains delivered to /var/mail/vhosts/inbox/ (default example.test)
#   SMTPGUARD_HOST  the name of the smtpguard service (default smtpguard): the
#                 only client allowed to send XCLIENT.
set -euo pipefail
guard=${SMTPGUARD_HOST:-smtpguard}
addr=""
for _ in $(seq 1 60); do
  addr=$(getent ahostsv4 "$guard" | awk 'NR==1{print $1}') && [ -n "$addr" ] && break
  sleep 1
done
[ -n "$addr" ] || { echo "postfix-entrypoint: cannot resolve $guard" >&2; exit 1; }

cp /usr/share/postfix/master.cf.dist /etc/postfix/master.cf
: > /etc/postfix/main.cf
postconf -e \
  "myhostname = ${MYHOSTNAME:-mx.example.test}" "mydestination =" \
  "inet_interfaces = all" "inet_protocols = ipv4" \
  "maillog_file = /dev/stdout" \
  "alias_maps =" "alias_database =" "compatibility_level = 3.6" \
  "virtual_mailbox_domains = ${MAIL_DOMAINS:-example.test}" "virtual_mailbox_base = /var/mail/vhosts" \
  "virtual_mailbox_maps = static:inbox/" "virtual_uid_maps = static:5000" "virtual_gid_maps = static:5000" \
  "smtpd_authorized_xclient_hosts = $addr" \
  "smtpd_forbid_bare_newline = reject" "smtpd_forbid_bare_newline_exclusions =" \
  "mynetworks = 127.0.0.0/8"
postconf -F '*/*/chroot = n'
mkdir -p /var/mail/vhosts && chown 5000:5000 /var/mail/vhosts
echo "postfix-entrypoint: XCLIENT allowed from $guard ($addr) only"
postfix check
exec postfix start-fg
