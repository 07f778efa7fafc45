"""Secret stores: where secret material lives. ``open_store(config)`` picks the backend."""

from proxy.store.base import SecretEntry, SecretStore

__all__ = ["SecretEntry", "SecretStore", "open_store"]


def open_store(secrets_cfg, *, base_dir=None) -> SecretStore:
    if secrets_cfg.backend == "vault":
        from proxy.store.vault import VaultStore

        return VaultStore(secrets_cfg.vault)
    from proxy.store.file import FileStore

    return FileStore.from_config(secrets_cfg.file, base_dir=base_dir)
