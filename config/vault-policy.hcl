# Least privilege for publer-proxy: read its one key, nothing else.
# KV v2 at mount "secret": data/ is the key, metadata/ gives its version and created_time.
path "secret/data/publer/api" {
  capabilities = ["read"]
}

path "secret/metadata/publer/api" {
  capabilities = ["read"]
}

# Tokens renew themselves; no policy is needed for auth/token/renew-self and lookup-self,
# which the default policy grants.
