"""The configuration file: models, field types, loading and checks."""
