# For config/least-privilege.yaml: this proxy reads its two keys and nothing else.
# A second proxy (another team) gets a policy of its own naming only its own paths.
path "secret/data/publer/posting" {
  capabilities = ["read"]
}

path "secret/data/publer/reporting" {
  capabilities = ["read"]
}
