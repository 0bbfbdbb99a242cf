"""The worker runtime: one process that loads one function (or class) and runs its jobs."""
