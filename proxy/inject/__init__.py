"""Injectors put secret material into an ``Outbound`` request. No network I/O here.

``Material`` maps a field name (``secret``, ``username``, ...) or a reference
string (``PATH#FIELD``, for template placeholders) to its ``Secret``.
"""

from proxy.inject.static import BasicInjector, HeaderInjector, Injector, Material, QueryInjector, injector_for

__all__ = ["BasicInjector", "HeaderInjector", "Injector", "Material", "QueryInjector", "injector_for"]
