"""The message boundary: every entry taken off a queue is screened below kombu's decoding and
becomes a checked Cascade task message or a dead letter (with a failed reply where there is an
id to report to).
"""
