"""Python environments for functions: their specs, their builds, and the code bundles they run."""
