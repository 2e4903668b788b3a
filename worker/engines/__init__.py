"""Alignment engines: each is loaded once per worker process."""
