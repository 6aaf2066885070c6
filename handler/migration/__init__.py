"""Both ends of a live migration, for every driver: the engines and what they share.

Layout (one concept per module):
  handoff.py      the hand-off record in the VMI status, and the arbiter (switchover)
"""
