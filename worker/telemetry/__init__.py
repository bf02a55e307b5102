"""Telemetry of a worker: traces, metrics, logs, the Prometheus endpoint, GenAI attribute names,
SDK setup and the Celery signals that drive them.
"""
