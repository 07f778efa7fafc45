"""The admin listener, probes, and the workers' supervisor API."""
