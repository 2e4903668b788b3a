"""`--cluster slurm` on a real single-node Slurm (slurmctld + slurmd as root, munge) started here."""

from __future__ import annotations

import os
import sys

import pytest

from bench.synth_corpus import make_corpus
from cluster_helpers import cluster_args, write_config
from helpers import events, named, run_cli
from slurm_helpers import LocalSlurm, slurm_missing

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = slurm_missing()
    if why:  # CI runs as root and installs slurm-wlm: there a missing Slurm is a failure
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Slurm tests: {why}")
        pytest.skip(why)
    s = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        s.start()
        yield s
    finally:
        s.stop()


def _mib(slurm_size: str) -> int:
    return int(float(slurm_size[:-1]) * {"M": 1, "G": 1024, "T": 1024**2}[slurm_size[-1]])


def _slurm_config(tmp_path, memory: str = "500MiB") -> str:
    return f"""
[cluster.slurm]
partition = "debug"
walltime = "00:15:00"
cores = 1
memory = "{memory}"
max_jobs = 2
max_memory = "1500MiB"
python = "{sys.executable}"
scheduler_host = "127.0.0.1"
log_directory = "{tmp_path / 'slurm-logs'}"
job_extra = ["--comment=batchalign-test"]
"""


def test_slurm_run_aligns_a_corpus_with_jobs_sized_from_the_config(slurm, tmp_path):
    corpus = tmp_path / "corpus"
    files = make_corpus(corpus, [5, 8, 6, 20, 7, 5])
    out, log = tmp_path / "out", tmp_path / "run.jsonl"
    cfg = write_config(tmp_path, _slurm_config(tmp_path))
    r = run_cli(cluster_args(corpus, out, "slurm", cfg, "--log-json", str(log)), tmp_path, timeout=240,
                SLURM_CONF=str(slurm.conf))
    assert r.returncode == 0, r.stderr[-3000:] + slurm.logs()
    evs = events(log)
    assert {e["file"] for e in named(evs, "file_done")} == {p.name for p in files}
    started = named(evs, "slurm_cluster_started")[0]
    assert "#SBATCH --mem=500M" in started["job_script"] and "#SBATCH --comment=batchalign-test" in started["job_script"]
    assert "supervisor.cluster.worker" in started["job_script"]
    submitted = named(evs, "slurm_job_submitted")
    assert 1 <= len(submitted) <= 2 and all(e["memory_mb"] == 500 for e in submitted)
    # Slurm itself ran those jobs with that memory and the configured extras.
    jobs = {j["JobId"]: j for j in slurm.jobs()}
    for e in submitted:
        job = jobs[str(e["job_id"])]
        assert _mib(job["MinMemoryNode"]) == 500 and job["Partition"] == "debug" and job["Comment"] == "batchalign-test"
    assert all(e["worker"].startswith("tcp://127.0.0.1:") for e in named(evs, "file_done"))


def test_slurm_memory_killed_file_is_retried_in_a_job_with_more_memory(slurm, tmp_path):
    corpus = tmp_path / "corpus"
    # f000 grows by 600 MiB: more than a 500 MiB job holds, less than max_memory.
    files = make_corpus(corpus, [150, 5, 6])
    out, log = tmp_path / "out", tmp_path / "run.jsonl"
    cfg = write_config(tmp_path, _slurm_config(tmp_path))
    r = run_cli(cluster_args(corpus, out, "slurm", cfg, "--log-json", str(log)), tmp_path, timeout=240,
                SLURM_CONF=str(slurm.conf))
    assert r.returncode == 0, r.stderr[-3000:] + slurm.logs()
    evs = events(log)
    assert {e["file"] for e in named(evs, "file_done")} == {p.name for p in files}
    failed = [e for e in named(evs, "file_failed") if e["file"] == "f000.cha"]
    assert failed and failed[0]["kind"] in ("memory", "lost")
    requests = [e["request_mb"] for e in named(evs, "file_admitted") if e["file"] == "f000.cha"]
    assert len(requests) == len(failed) + 1 and requests[-1] > requests[0]
    sized = [e for e in named(evs, "slurm_job_submitted") if e["kind"] == "sized"]
    assert sized and sized[-1]["memory_mb"] > 500 and sized[-1]["memory_mb"] >= requests[-1]
    done = next(e for e in named(evs, "file_done") if e["file"] == "f000.cha")
    assert done["peak_mb"] > 500 * 0.95 and done["peak_mb"] <= requests[-1]
    jobs = {j["JobId"]: j for j in slurm.jobs()}
    assert _mib(jobs[str(sized[-1]["job_id"])]["MinMemoryNode"]) >= sized[-1]["memory_mb"]
