"""Injectors put secret values into an ``Outbound`` request. No network I/O here.

``proxy.auth_types`` says which injector each auth type uses.
"""

from proxy.inject.base import Injector, SecretValues
from proxy.inject.static import BasicInjector, HeaderInjector, QueryInjector

__all__ = ["BasicInjector", "HeaderInjector", "Injector", "QueryInjector", "SecretValues"]
