"""The `ember` command line (Typer + Rich)."""
