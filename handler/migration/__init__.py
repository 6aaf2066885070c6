"""Both ends of a live migration, for every driver: the engines and what they share.

Layout (one concept per module).

Common to both ends:
  handoff.py         the hand-off record in the VMI status, the arbiter (switchover), and
                     read_token (the stream token, from the migration's Secret)
  tunnel.py          the QEMU tunnel protocol's constants and its error

The sending side (one engine per outgoing migration; ``Driver.source_engine`` makes it):
  source.py          SourceEngine: what both drivers' source engines share (run skeleton,
                     failure reasons, _fail and the arbiter, progress writes)
  stats.py           Stats (migrationState.transfer, the metrics) and live rate measures
  convergence.py     pre-copy decisions and the timeout monitor, pure (a clock reading in)
  target_stream.py   a source-side stream to the target (reader loop, readable errors)
  channels.py        memvm: the Transfer streams (flow-control credits, acks, control)
  sender.py          memvm: rounds, batches, pacing; DirtyMeter (the dirty log, live)
  postcopy_source.py memvm: the post-copy switch, push, fault serving, reconnect
  memvm_source.py    MemvmSourceMigration: the memvm source, a thin orchestrator
  qemu_plan.py       QEMU's capabilities and parameters from the migration configuration
  qemu_channel.py    QEMU: one QEMU connection tunnelled through one gRPC stream
  qemu_source.py     QemuSourceMigration: the QEMU source

The receiving side (one registry of expected migrations, two services):
  target_state.py    the receiving handler's state machine (states, transition table)
  incoming.py        IncomingMigration (one expected migration; decide() takes the
                     decision) and IncomingRegistry (shared by both target services)
  peer.py            the admission checks of both target services (registry, peer
                     certificate, token)
  restart_record.py  what a target handler restarted after the hand-off resumes from
  memvm_target.py    the memvm target: the Transfer service
  qemu_target.py     the QEMU target: the Tunnel service

Streams in processes of their own (memvm channels 1.., both sides; stream_workers):
  worker_link.py     what a handler and its stream workers say to each other
  stream_worker.py   the worker process: one channel's sending or receiving end
  worker_pool.py     the handler's workers, and the channels that stand for them
                     (RemoteChannel at the source, RemoteReceiver at the target)
"""
