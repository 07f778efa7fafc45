"""What ops see: audit trail, alerts, metrics, log setup."""
