"""The load-test harness: the gateway measured as a ratio to a bare FastAPI app (`make bench`)."""
