"""Both ends of a live migration, for every driver: the engines and what they share.

Layout (one concept per module):
  handoff.py      the hand-off record in the VMI status, and the arbiter (switchover);
                  read_token: the migration's stream token from its Secret
  source.py       SourceEngine: what both drivers' source engines share (run skeleton,
                  failure reasons, _fail and the arbiter, progress writes)
  stats.py        Stats (migrationState.transfer, the metrics) and live rate measures
  convergence.py  pre-copy decisions and the timeout monitor, pure (a clock reading in)
  target_stream.py  a source-side stream to the target (reader loop, readable errors)
  channels.py     memvm: the Transfer streams (flow-control credits, acks, control)
  sender.py       memvm: rounds, batches, pacing; DirtyMeter (the dirty log, live)
  postcopy_source.py  memvm: the post-copy switch, push, fault serving, reconnect
  memvm_source.py MemvmSourceMigration: the memvm source, a thin orchestrator
  qemu_plan.py    QEMU's capabilities and parameters from the migration configuration
  qemu_channel.py QEMU: one QEMU connection tunnelled through one gRPC stream
  qemu_source.py  QemuSourceMigration: the QEMU source
"""
