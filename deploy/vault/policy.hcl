# credproxy's Vault (or OpenBao) policy: the least it needs, nothing more.
#
# Assumes secrets.vault.kv_mount: secret (a KV v2 mount) and this layout under it:
#   credproxy/...           secrets credproxy injects (API keys, client secrets, passwords):
#                           read-only, e.g. credproxy/shared/stripe#api_key
#   credproxy/rotating/...  refresh tokens the provider rotates: credproxy writes the new one
#                           back (put the refresh_token references of oauth2_refresh_token
#                           credentials here)
#   credproxy/cluster/...   tokens shared between replicas (cluster.backend: vault), SPEC §9
# For a sidecar per app, narrow "credproxy/" to the app's prefix (e.g. "credproxy/billing/")
# in that app's copy. Change the mount name and prefixes together if your layout differs.
# Vault applies the most specific matching path, so the stanzas below do not add up: a path
# under rotating/ gets exactly what the rotating/ stanza says.
#
# Install:  vault policy write credproxy deploy/vault/policy.hcl
# and attach it to the AppRole / Kubernetes role credproxy logs in with.

# --- secrets it injects: read the data, and the metadata for rotation polling (version only) ---
path "secret/data/credproxy/*" {
  capabilities = ["read"]
}
path "secret/metadata/credproxy/*" {
  capabilities = ["read"]
}

# --- rotated refresh tokens: read, and write back with check-and-set (KV v2 "cas") ---
# "create" for the first version, "update" for later ones. No delete, no list.
path "secret/data/credproxy/rotating/*" {
  capabilities = ["read", "create", "update"]
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
# (and its lease) with check-and-set, the others read it. Omit this stanza otherwise: the
# paths stay readable through the first stanza, but not writable.
path "secret/data/credproxy/cluster/*" {
  capabilities = ["read", "create", "update"]
}
