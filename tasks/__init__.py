"""The task ``cascade.chat``, its wire schemas, and the producer client.

Importing this package loads nothing of the worker: producers use ``tasks.producer.client`` and
``tasks.contract.schemas`` alone.
"""
