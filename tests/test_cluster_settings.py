"""[cluster] and [cluster.slurm] go through the usual layering: defaults, file, environment, CLI."""

from __future__ import annotations

import pytest

from supervisor.settings import SettingsError, load_settings


def test_cluster_slurm_layers_file_then_environment_then_cli(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[cluster]\naddress = "slurm"\n[cluster.slurm]\npartition = "gpu"\nmemory = "8GiB"\n'
                   'max_jobs = 3\njob_extra = ["--qos=low"]\n')
    s = load_settings(config=cfg, environ={"BATCHALIGN_SUPERVISE_CLUSTER_SLURM_MEMORY": "6GiB",
                                           "BATCHALIGN_SUPERVISE_CLUSTER_SLURM_JOB_EXTRA": "--qos=high;--exclusive"})
    assert s.cluster.address == "slurm"
    assert s.cluster.slurm.partition == "gpu" and s.cluster.slurm.max_jobs == 3
    assert s.cluster.slurm.memory == 6 * 2**30  # the environment beats the file
    assert s.cluster.slurm.job_extra == ["--qos=high", "--exclusive"]
    s = load_settings(config=cfg, environ={}, cli={"cluster": {"address": "tcp://10.0.0.5:8786"}})
    assert s.cluster.address == "tcp://10.0.0.5:8786" and s.cluster.slurm.job_extra == ["--qos=low"]


def test_bad_cluster_settings_name_the_key(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[cluster.slurm]\nmemmory = "8GiB"\n')
    with pytest.raises(SettingsError, match="memmory"):
        load_settings(config=cfg, environ={})
    with pytest.raises(SettingsError, match="not tcp://HOST:PORT, local or slurm"):
        load_settings(config=None, environ={"BATCHALIGN_SUPERVISE_CLUSTER_ADDRESS": "10.0.0.5:8786"})
    with pytest.raises(SettingsError, match="memory"):
        load_settings(config=None, environ={"BATCHALIGN_SUPERVISE_CLUSTER_SLURM_MEMORY": "lots"})
