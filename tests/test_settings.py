"""Settings layering: defaults -> config.toml -> environment -> command line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from supervisor.settings import Settings, SettingsError, env_mapping, load_settings, reload_settings

pytestmark = pytest.mark.timeout(30)
ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_toml_states_the_defaults():
    loaded = load_settings(config=ROOT / "config.toml", environ={})
    defaults = Settings()
    for section in ("run", "memory", "service"):
        assert dataclasses.asdict(getattr(loaded, section)) == dataclasses.asdict(getattr(defaults, section)), section
    for name, eng in defaults.engine.items():
        assert dataclasses.asdict(loaded.engine[name]) == dataclasses.asdict(eng), name


def test_every_config_key_is_commented():
    text = (ROOT / "config.toml").read_text().splitlines()
    for i, line in enumerate(text):
        if "=" in line and not line.lstrip().startswith("#"):
            above = text[i - 1].lstrip() if i else ""
            assert "#" in line or above.startswith("#"), f"config.toml line {i + 1} has no comment: {line}"


def test_layers_override_in_order(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\nengine = "whisper"\nmax_attempts = 5\n[memory]\nbudget = "6GiB"\npoll_interval = "500ms"\n'
                   '[engine.synthetic]\nmb_per_audio_second = 9.0\n')
    env = {"BATCHALIGN_SUPERVISE_MAX_ATTEMPTS": "7", "BATCHALIGN_SUPERVISE_MEMORY_BUDGET": "5000MB",
           "BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_BASELINE_MB": "12"}
    s = load_settings(config=cfg, environ=env, cli={"run": {"max_attempts": 2}})
    assert s.run.engine == "whisper"  # file
    assert s.memory.poll_interval == 0.5  # file, parsed duration
    assert s.memory.budget == 5_000_000_000  # env over file
    assert s.run.max_attempts == 2  # command line over env
    assert s.engine["synthetic"].mb_per_audio_second == 9.0
    assert s.engine["synthetic"].baseline_mb == 12.0
    assert s.model_id == "openai/whisper-base"


@pytest.mark.parametrize("content,needle", [
    ('[run]\nengine = "bert"\n', "bert"),
    ('[memory]\nbudget = "lots"\n', "budget"),
    ('[run]\nnope = 1\n', "nope"),
    ('[bogus]\n', "bogus"),
    ('[memory]\nresume_below = 0.99\n', "bands"),
    ('[run\n', "c.toml"),
])
def test_bad_config_names_the_key(tmp_path, content, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(content)
    with pytest.raises(SettingsError) as exc:
        load_settings(config=cfg, environ={})
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_environment_variable_is_an_error():
    with pytest.raises(SettingsError, match="BATCHALIGN_SUPERVISE_BOGUS"):
        env_mapping({"BATCHALIGN_SUPERVISE_BOGUS": "1"})


def test_reload_rereads_file_but_keeps_command_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[memory]\nbudget = "1GiB"\n[run]\nmax_attempts = 4\n')
    s = load_settings(config=cfg, environ={}, cli={"run": {"max_attempts": 9}})
    s.corpus = [tmp_path]
    cfg.write_text('[memory]\nbudget = "2GiB"\n[run]\nmax_attempts = 4\n')
    new = reload_settings(s, environ={}, cli={"run": {"max_attempts": 9}})
    assert new.memory.budget == 2 * 2**30
    assert new.run.max_attempts == 9
    assert new.corpus == [tmp_path]


def test_default_paths_follow_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    s = Settings()
    assert s.telemetry_path == tmp_path / "batchalign-supervise" / "telemetry.sqlite"
    s.out = tmp_path / "out"
    assert s.log_path == tmp_path / "out" / "batchalign-supervise.log.jsonl"


def test_whispers_joint_forcing_is_a_setting_that_reaches_the_engine_and_the_output_identity():
    from supervisor.identity import output_identity
    from supervisor.supervisor import engine_options
    from worker.engines.whisper import Steps

    default = load_settings(environ={"BATCHALIGN_SUPERVISE_ENGINE": "whisper"})
    joint = load_settings(environ={"BATCHALIGN_SUPERVISE_ENGINE": "whisper",
                                   "BATCHALIGN_SUPERVISE_ENGINE_WHISPER_JOINT": "true"})
    assert Steps.from_options(engine_options(default, 1)).joint is False
    assert Steps.from_options(engine_options(joint, 1)).joint is True
    # Outputs made one way are not "done" for the other.
    assert output_identity(default)["options"]["joint"] is False
    assert output_identity(joint)["options"]["joint"] is True


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("", None), ("4MiB", 4 * 2**20), ("128KiB", 131072)])
def test_an_engines_mmap_threshold_is_auto_empty_or_a_size(value, expected):
    s = load_settings(environ={"BATCHALIGN_SUPERVISE_ENGINE_WHISPER_MMAP_THRESHOLD": value})
    assert s.engine["whisper"].mmap_threshold == expected
    assert s.engine["wav2vec"].mmap_threshold == "auto"  # the shipped default: the engine decides
