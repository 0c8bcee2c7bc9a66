"""The worker side: the bootstep and ``--flows`` services (step.py), the Celery signal
receivers (signals.py), the attempt guard (guard.py), leases and recovery
(recovery.py) and webhook delivery (webhooks.py)."""
