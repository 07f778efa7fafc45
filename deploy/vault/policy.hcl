# credproxy's Vault (or OpenBao) policy: the least it needs, nothing more.
#
# Assumes secrets.vault.kv_mount: secret (a KV v2 mount) and this layout under it:
#   credproxy/secrets/...   secrets credproxy injects (API keys, client secrets, passwords): read-only
#   credproxy/rotating/...  refresh tokens the provider rotates: credproxy writes the new one back
#   credproxy/cluster/...   tokens shared between replicas (cluster.backend: vault), SPEC §9
# Config references then read e.g.  secret: credproxy/secrets/example#token
# Change the mount name and prefixes together if your layout differs.
#
# Install:  vault policy write credproxy deploy/vault/policy.hcl
# and attach it to the AppRole / Kubernetes role credproxy logs in with.

# --- secrets it injects: read the data, and the metadata for rotation polling (version only) ---
path "secret/data/credproxy/secrets/*" {
  capabilities = ["read"]
}
path "secret/metadata/credproxy/secrets/*" {
  capabilities = ["read"]
}

# --- rotated refresh tokens: read, and write back with check-and-set (KV v2 "cas") ---
# "create" for the first version, "update" for later ones. No delete, no list.
path "secret/data/credproxy/rotating/*" {
  capabilities = ["read", "create", "update"]
}
path "secret/metadata/credproxy/rotating/*" {
  capabilities = ["read"]
}

# --- its own token: look it up (tells an expired token from a denied secret) and renew it ---
# Vault's "default" policy grants these too; they are listed so that a role created with
# token_no_default_policy=true still works.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}

# --- cluster token sharing (cluster.backend: vault; cluster.path defaults to credproxy/cluster) ---
# Only needed when several replicas share tokens: one replica refreshes and stores the token
# (and its lease) with check-and-set, the others read it. Omit this stanza otherwise.
path "secret/data/credproxy/cluster/*" {
  capabilities = ["read", "create", "update"]
}
path "secret/metadata/credproxy/cluster/*" {
  capabilities = ["read"]
}
