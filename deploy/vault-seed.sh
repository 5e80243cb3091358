#!/bin/sh
# The compose stacks' one-shot seeding job (service vault-seed), run in the openbao/openbao
# image against the dev server: what an operator does once for a real Vault.
#   1. the Publer key at secret/publer/api, field api_key, read from a file (a compose
#      secret), never from an environment variable or a command line;
#   2. the proxy's least-privilege policy (config/vault-policy.hcl: read that one secret)
#      and an AppRole that grants only it;
#   3. the role id and a secret id, in files that only the proxy mounts (owned by its uid,
#      mode 0400); the proxy logs in with them (vault.auth.method: approle);
#   4. with PROXY_CONFIG_TEMPLATE: a client token for the example app, in a file that only
#      the app mounts, and the proxy config with that token's digest in place of the
#      template's all-zero one (which matches no token).
# Safe to run again (`docker compose up` restarts it): Vault is written afresh, a new secret
# id is added, and the client token already issued is kept, so a running proxy and app agree.
set -eu

: "${BAO_ADDR:?set BAO_ADDR to the Vault address, such as http://vault:8200}"
ROOT_TOKEN_FILE=${ROOT_TOKEN_FILE:-/vault-root/token}
PUBLER_API_KEY_FILE=${PUBLER_API_KEY_FILE:-/run/secrets/publer_api_key}
POLICY_FILE=${POLICY_FILE:-/deploy/vault-policy.hcl}
PROXY_CREDENTIALS_DIR=${PROXY_CREDENTIALS_DIR:-/proxy-credentials}
APP_CREDENTIALS_DIR=${APP_CREDENTIALS_DIR:-/app-credentials}
PROXY_CONFIG_TEMPLATE=${PROXY_CONFIG_TEMPLATE:-}
PROXY_UID=${PROXY_UID:-10001}
APP_UID=${APP_UID:-10001}
ROLE=publer-proxy
ZERO_DIGEST=sha256:0000000000000000000000000000000000000000000000000000000000000000

say() { echo "vault-seed: $*"; }
fail() { echo "vault-seed: $*" >&2; exit 1; }

# install_file PATH UID MODE: stdin to PATH, replaced at once, owned by UID when run as root.
install_file() {
  cat >"$1.new"
  chmod "$3" "$1.new"
  if [ "$(id -u)" = 0 ]; then chown "$2:$2" "$1.new"; fi
  mv -f "$1.new" "$1"
}

BAO_TOKEN=$(cat "$ROOT_TOKEN_FILE")
export BAO_ADDR BAO_TOKEN
umask 077

grep -q '[^[:space:]]' "$PUBLER_API_KEY_FILE" 2>/dev/null ||
  fail "no key in $PUBLER_API_KEY_FILE; give a file holding the Publer API key"
# @file: the key goes from the file to Vault, never through a command line. The proxy trims
# the newline a file usually ends with.
bao kv put -mount=secret publer/api "api_key=@$PUBLER_API_KEY_FILE" >/dev/null
say "wrote the Publer key to secret/publer/api"

bao policy write "$ROLE" "$POLICY_FILE" >/dev/null
if ! bao auth list -format=json | grep -q '"approle/"'; then
  bao auth enable approle >/dev/null
fi
# Secret ids never expire and may be used again: the proxy logs in again with the same
# file whenever its token reaches token_max_ttl.
bao write "auth/approle/role/$ROLE" token_policies="$ROLE" token_ttl=1h token_max_ttl=4h \
  secret_id_ttl=0 secret_id_num_uses=0 >/dev/null
say "policy $ROLE and AppRole $ROLE written"

mkdir -p "$PROXY_CREDENTIALS_DIR"
chmod 0755 "$PROXY_CREDENTIALS_DIR"
bao read -field=role_id "auth/approle/role/$ROLE/role-id" |
  install_file "$PROXY_CREDENTIALS_DIR/role-id" "$PROXY_UID" 0400
bao write -f -field=secret_id "auth/approle/role/$ROLE/secret-id" |
  install_file "$PROXY_CREDENTIALS_DIR/secret-id" "$PROXY_UID" 0400
say "role id and secret id written to $PROXY_CREDENTIALS_DIR"

if [ -n "$PROXY_CONFIG_TEMPLATE" ]; then
  grep -q "$ZERO_DIGEST" "$PROXY_CONFIG_TEMPLATE" ||
    fail "$PROXY_CONFIG_TEMPLATE has no $ZERO_DIGEST to replace"
  mkdir -p "$APP_CREDENTIALS_DIR"
  chmod 0755 "$APP_CREDENTIALS_DIR"
  if [ -s "$APP_CREDENTIALS_DIR/client-token" ]; then
    token=$(cat "$APP_CREDENTIALS_DIR/client-token")
  else
    token=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
    printf '%s\n' "$token" | install_file "$APP_CREDENTIALS_DIR/client-token" "$APP_UID" 0400
  fi
  digest=$(printf '%s' "$token" | sha256sum | cut -d' ' -f1)
  sed "s/$ZERO_DIGEST/sha256:$digest/" "$PROXY_CONFIG_TEMPLATE" |
    install_file "$PROXY_CREDENTIALS_DIR/proxy.yaml" "$PROXY_UID" 0444
  say "client token written to $APP_CREDENTIALS_DIR, proxy config to $PROXY_CREDENTIALS_DIR"
fi
