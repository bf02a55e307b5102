"""Everything that touches Redis for a run: the run's owner (``session``: open, publish, hand
off, finish, abandon), its lease, the event publisher, every Lua script (``lua``), the reply
store and dead letters, pending records, the reaper, dead runs (``deaths``, ``recovery``) and
cooldowns. Key names live in ``tasks.contract.keys``; nothing here imports the task.
"""
