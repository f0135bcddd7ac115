"""Protection methods: one module per method, one class behind the common ``protect`` interface."""

from faceshield.methods.base import ProtectionMethod, ProtectionResult, create_method, list_methods

__all__ = ["ProtectionMethod", "ProtectionResult", "create_method", "list_methods"]
