"""vmferry's shared core: what the controller, the handlers and the CLI have in common.

The rooms (``controller/`` and ``handler/`` import from here; nothing here imports them):

- ``objects/``: the object model -- kinds, naming rules, schema validation and defaults,
  quantities, label selectors, conditions, JSON patch, JSONPath. Pure functions on dicts.
- ``migration_state.py``: the migration contract -- phases, decisions, the
  ``migrationState`` fields and who writes them, the configuration and its defaults, the
  token Secret.
- the API client: ``client.py`` (``ApiClient``), ``config.py`` (client and daemon
  configuration), ``informer.py`` (list-and-watch caches and the work queue), and
  ``errors.py`` (the API's errors, shared with the server).
- daemon plumbing: ``grpc_options.py`` (every gRPC channel/server option),
  ``httpserve.py`` (aiohttp servers of the console and metrics), ``metrics_http.py``
  (``/metrics``, ``/healthz``, ``/readyz`` and who may read them), ``logs.py`` (logfmt logging).
- ``pki/``: the cluster CA, identities and TLS credentials.
- ``cli/``: the ``vmferry`` command; ``lab/``: a local cluster and ``make demo``;
  ``rpc/``: code generated from ``proto/``.

Each package's ``__init__`` (or each module's ``__all__``) states its public surface.
"""
