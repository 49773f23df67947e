"""The JWTPolicy model, its parser and workload selection. Pure: no I/O."""
