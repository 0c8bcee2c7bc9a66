"""The version of celery-flows (setup.cfg carries the same number)."""

__version__ = "0.1.0"
