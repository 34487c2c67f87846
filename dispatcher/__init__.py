"""Kafka-based webhook dispatcher for ``visitor.identified`` events."""

__version__ = "0.1.0"
