"""Distributed engines: how sharded and partitioned parameters are completed."""
