"""The wire contract: request, reply and event schemas, and Redis key names. Imports nothing else
of Cascade.
"""
