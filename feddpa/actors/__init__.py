"""Client hosts: data shards, dual adapters and training engines (Ray actors wrap them)."""
