"""The supervisor: CLI, settings, the run loop and the services around it."""

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("batchalign-supervise")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
