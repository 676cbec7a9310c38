"""
Brokers: where rooms live.  L{interfaces.IBroker} is the contract,
L{memory.MemoryBroker} the embedded single-instance broker and
L{redis.RedisBroker} the one that spans instances.
"""
