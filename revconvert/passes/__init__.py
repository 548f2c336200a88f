"""Pass layer: channel surgery, conversion, checkpointing of stored parts, recompute planning.

Builds on the analysis layer (what to convert) and the runtime layer (what the result executes).
"""
