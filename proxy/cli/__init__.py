"""Command line: subcommands and the admin API's clients. Never prints a secret value."""
