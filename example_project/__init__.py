"""A runnable celery-flows example: a daily sales report built from several sources.

``python3 example_project/run.py`` runs it end to end on an embedded Redis; the app,
its tasks and the flow definition live in :mod:`example_project.proj`.
"""
