"""Cluster backends: the same run on Dask distributed (an existing scheduler, a LocalCluster) or on
Slurm through dask-jobqueue, with each file's predicted peak as its Dask memory request.

Needs the optional ``cluster`` extra (``pip install -e '.[cluster]'``); the local process pool does
not import anything from here.
"""

from __future__ import annotations

TOPIC_READY = "batchalign-ready"  # a worker process loaded its engine: {pid, baseline_rss_mb, ...}
TOPIC_FILE = "batchalign-file"  # a file started or progressed on a worker: {key, file, pid, rss_mb, ...}
MEM = "MEM"  # the Dask resource: MiB a worker offers to one file's peak (baseline included)


class ClusterUnavailable(RuntimeError):
    """The cluster extra is missing or the cluster cannot be reached/started; one line for the user."""


def require_distributed() -> None:
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ClusterUnavailable("--cluster needs the optional 'cluster' extra: pip install 'batchalign-supervise[cluster]'"
                                 ) from None
