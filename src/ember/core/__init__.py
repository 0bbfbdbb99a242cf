"""The pure core: decisions as functions over plain dataclasses, with no I/O and no clock reads.

The live control plane and the simulator both call these, so a simulated answer is the
answer the server would give.
"""
