"""Analysis layer: tracing, residual-block discovery, eligibility rules and the audit.

Imports the runtime only to treat its modules (segments, checkpointed runs) as opaque leaves.
"""
