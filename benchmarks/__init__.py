"""Benchmarks of celery-flows against plain Celery: ``python benchmarks/run.py``."""
