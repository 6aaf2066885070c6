"""Both ends of a live migration, for every driver: the engines and what they share.

Layout (one concept per module):
  handoff.py         the hand-off record in the VMI status, the arbiter (switchover), and
                     read_token (the stream token, from the migration's Secret)
  tunnel.py          the QEMU tunnel protocol's constants and its error
  target_state.py    the receiving handler's state machine (states, transition table)
  incoming.py        IncomingMigration (one expected migration; decide() takes the
                     decision) and IncomingRegistry (shared by both target services)
  peer.py            the admission checks of both target services (registry, peer
                     certificate, token)
  restart_record.py  what a target handler restarted after the hand-off resumes from
  memvm_target.py    the memvm target: the Transfer service
  qemu_target.py     the QEMU target: the Tunnel service
"""
