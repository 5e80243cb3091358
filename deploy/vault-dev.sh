#!/bin/sh
# OpenBao in dev mode for the compose stacks (in memory, unsealed, KV v2 at secret/), run
# as root in the openbao/openbao image. Its root token is made up at each start and kept in
# a file on the vault-root volume, which only the seed job also mounts: no compose file,
# image or environment of another service holds it. (A dev server still prints it in its own
# log: dev mode is for trying things out, never for a real key.)
set -eu
ROOT_TOKEN_FILE=${ROOT_TOKEN_FILE:-/vault-root/token}
LISTEN_ADDRESS=${LISTEN_ADDRESS:-0.0.0.0:8200}
umask 077
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$ROOT_TOKEN_FILE"
BAO_DEV_ROOT_TOKEN_ID=$(cat "$ROOT_TOKEN_FILE")
export BAO_DEV_ROOT_TOKEN_ID
exec su-exec openbao bao server -dev -dev-no-store-token -dev-listen-address="$LISTEN_ADDRESS"
