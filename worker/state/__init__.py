"""Everything that touches Redis for a run: leases, the opening and closing scripts, the event
publisher, the reply store and dead letters, pending records, the reaper and cooldowns.
"""
