"""credproxy: a named-credential secrets proxy."""

__version__ = "0.1.0"
