"""Generated gRPC stubs of etcd's v3 API (from proto/vmferry/etcdpb: make proto)."""
