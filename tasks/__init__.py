"""The task ``cascade.chat``, its wire schemas, and the producer client.

Importing this package loads nothing of the worker: producers use ``tasks.client`` and
``tasks.schemas`` alone.
"""
