"""Telemetry for the supervisor: structured logs, the SQLite store and the memory predictor.

Submodules are imported directly (``telemetry.store``, ``telemetry.model``, ``telemetry.logging``)
so a worker that only logs never pays for the store, and the pure model stays importable anywhere.
"""
