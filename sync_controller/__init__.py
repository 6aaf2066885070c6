"""``vmferry-sync-controller``: one or more per cluster; relays decentralized (cross-cluster)
migrations' state to the peer cluster's sync controller (see :mod:`vmferry.decentralized`)."""
