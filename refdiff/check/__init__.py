"""Conformance checks of third-party implementations against the reference (``refdiff check TARGET``)."""

from .runner import PROTOCOL_METHODS, run_check, write_check

__all__ = ["PROTOCOL_METHODS", "run_check", "write_check"]
