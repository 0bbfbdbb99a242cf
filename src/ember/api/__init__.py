"""The HTTP API: thin FastAPI routers over the control plane; no business logic here."""
