#!/bin/sh
# One-shot set-up of the dev OpenBao for credproxy, done the way production is set up:
# the policy from deploy/vault/policy.hcl, an AppRole bound to it, and the AppRole's
# role_id/secret_id written to files only credproxy's user can read. Then a random demo
# API key at secret/credproxy/demo#token (read from stdin, never from argv).
# Needs BAO_ADDR and BAO_TOKEN (the dev root token) in the environment.
set -eu
POLICY_FILE=${POLICY_FILE:-/deploy/vault/policy.hcl}
OUT_DIR=${OUT_DIR:-/run/credproxy-vault}
CREDPROXY_UID=${CREDPROXY_UID:-10001}

i=0
until bao status >/dev/null 2>&1; do
  i=$((i + 1))
  [ "$i" -le 60 ] || { echo "OpenBao at $BAO_ADDR did not come up" >&2; exit 1; }
  sleep 1
done

bao policy write credproxy "$POLICY_FILE" >/dev/null
bao auth list -format=json | grep -q '"approle/"' || bao auth enable approle >/dev/null
bao write auth/approle/role/credproxy token_policies=credproxy token_ttl=1h token_max_ttl=4h \
  secret_id_ttl=24h >/dev/null

umask 077
bao read -field=role_id auth/approle/role/credproxy/role-id >"$OUT_DIR/role_id"
bao write -f -field=secret_id auth/approle/role/credproxy/secret-id >"$OUT_DIR/secret_id"
chown "$CREDPROXY_UID:$CREDPROXY_UID" "$OUT_DIR/role_id" "$OUT_DIR/secret_id"

if ! bao kv get -mount=secret credproxy/demo >/dev/null 2>&1; then
  key="sk_demo_$(tr -dc 'a-f0-9' </dev/urandom | head -c 24)"
  printf '%s' "$key" | bao kv put -mount=secret credproxy/demo token=- >/dev/null
fi
echo "OpenBao ready: policy credproxy, AppRole credproxy, secret/credproxy/demo#token"
