"""The Python SDK: apps, decorators, function and job handles, the HTTP client."""
