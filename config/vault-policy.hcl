# Least privilege for publer-proxy: read its one key, nothing else.
# KV v2 at mount "secret": a read of data/ returns the value with its version and
# created_time, which is all the proxy needs (no metadata/, no list, no write).
path "secret/data/publer/api" {
  capabilities = ["read"]
}

# Token renewal and self-lookup come from Vault's built-in default policy.
