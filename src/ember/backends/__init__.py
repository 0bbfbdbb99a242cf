"""Backends start and stop workers: `local` (OS processes on this machine) for now."""
