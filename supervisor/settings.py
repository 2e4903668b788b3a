"""One typed settings object, layered: defaults -> config.toml -> environment -> command line.

Every key has one home (a dataclass field); config.toml sections mirror the dataclasses and the
environment uses ``BATCHALIGN_SUPERVISE_<SECTION>_<KEY>`` (``[run]`` keys drop the section:
``BATCHALIGN_SUPERVISE_ENGINE``, ``BATCHALIGN_SUPERVISE_MEMORY_BUDGET``,
``BATCHALIGN_SUPERVISE_ENGINE_SYNTHETIC_BASELINE_MB``). A bad value raises ``SettingsError`` whose
one-line message names where the value came from, so the CLI can exit 2 with it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from supervisor.units import parse_duration, parse_size

ENV_PREFIX = "BATCHALIGN_SUPERVISE_"
ENGINES = ("wav2vec", "whisper", "synthetic")
DEFAULT_MODELS = {
    "wav2vec": "facebook/wav2vec2-base-960h",
    "whisper": "openai/whisper-base",
    "synthetic": "synthetic",
}


class SettingsError(ValueError):
    """A setting that cannot be used; the message is one line naming its source and key."""


def _size(default: int | None = None, **kw: Any) -> Any:
    return field(default=default, metadata={"kind": "size", **kw})


def _duration(default: float, **kw: Any) -> Any:
    return field(default=default, metadata={"kind": "duration", **kw})


@dataclass
class RunSettings:
    engine: str = "wav2vec"
    model: str = ""  # a store name, hub id or folder; empty: the engine's default model
    model_store: str = ""  # empty: $XDG_DATA_HOME/batchalign-supervise/models
    device: str = "cpu"
    dtype: str = "fp32"
    workers: str = "auto"  # an integer or "auto" (one per core, capped by memory)
    max_attempts: int = 3
    media_dir: str = ""  # where media live when not beside the transcripts (mirrors the corpus tree)
    state_dir: str = ""  # empty: $XDG_STATE_HOME/batchalign-supervise
    telemetry: str = ""  # empty: <state_dir>/telemetry.sqlite
    cache_max: int | None = _size(2 * 2**30)  # bytes the result cache may hold
    log_json: str = ""  # empty: <out>/batchalign-supervise.log.jsonl (in-place: <state_dir>/logs/)
    heartbeat_timeout: float = _duration(60.0)
    file_timeout: float = _duration(1800.0)  # base allowance per file ...
    file_timeout_per_audio_second: float = 10.0  # ... plus this much per audio second
    drain_grace: float = _duration(600.0)  # SIGTERM: how long running files may take to finish
    boot_timeout: float = _duration(600.0)  # a worker that is not READY by then is killed
    progress: str = "auto"  # auto | on | off
    start_method: str = "auto"  # auto (zygote for torch engines, spawn for synthetic) | spawn | zygote
    model_server: str = "auto"  # auto (on for --device cuda) | on | off: one model copy per GPU


@dataclass
class MemorySettings:
    budget: int | None = _size(None)  # bytes; empty: limit - reserve
    reserve: int | None = _size(None)  # bytes; empty: max(10% of the limit, 2 GiB)
    poll_interval: float = _duration(0.25)
    admit_below: float = 0.90  # fraction of the budget in use above which nothing new is admitted
    pause_above: float = 0.95  # pause the newest file above this
    resume_below: float = 0.85  # resume paused workers (oldest first) below this
    kill_above: float = 1.0  # the guard: kill one worker above this
    psi_admit_below: float = 20.0  # PSI memory "some" avg10 (%) above which nothing is admitted
    psi_pause_above: float = 60.0  # PSI memory "full" avg10 (%) above which the newest file pauses
    max_pause: float = _duration(300.0)  # a worker paused longer is killed and its file requeued
    kill_settle: float = _duration(3.0)  # after a kill, wait this long for memory to fall
    pause_cooldown: float = _duration(1.0)
    quantile: float = 0.9  # learned growth is lifted to this quantile of the residuals ...
    margin: float = 0.10  # ... then multiplied by 1 + margin
    min_samples: int = 3
    sample_log_interval: float = _duration(5.0)  # memory_sample events at most this often
    ledger: str = ""  # host-wide reservation ledger; "off" disables; empty: shared run directory
    vram_budget: int | None = _size(None)  # bytes of GPU memory the pool may use; empty: device - vram_reserve
    vram_reserve: int | None = _size(None)  # bytes; empty: max(5% of the device, 512 MiB)


@dataclass
class EngineDefaults:
    """Engine options and the cold-start memory model used before anything has been learned."""

    cold_baseline_mb: float = 1500.0  # a loaded worker before any file (USS)
    cold_intercept_mb: float = 200.0  # growth of a file whose spans are empty
    cold_mb_per_span_second: float = 10.0  # growth per second of the file's longest span
    cold_mb_per_audio_second: float = 0.0  # growth per audio second beyond the longest span
    cold_mb_per_media_mb: float = 60.0  # used when the audio duration is unknown
    span_seconds: float = 30.0
    calibrate: bool = True  # workers measure their growth on probe spans at READY
    # Heap blocks this large get a mapping of their own, given back when freed (glibc's
    # M_MMAP_THRESHOLD, fixed). Empty: glibc's sliding threshold, raised after each large free up
    # to 32 MiB, under which a file's buffers may come from a heap its earlier files fragmented.
    # auto: the engine's own choice (wav2vec2: one second of its first feature map; Whisper: half a
    # window of encoder states; the synthetic engine: empty).
    mmap_threshold: int | str | None = field(default=None, metadata={"kind": "size_or_auto"})
    threads: int = 0  # torch threads per worker; 0: cores / workers
    int8: bool = False
    share_weights: bool = True


@dataclass
class WhisperSettings(EngineDefaults):
    """Whisper's options: the defaults above, and how a span's utterances are forced."""

    cold_baseline_mb: float = 900.0
    cold_intercept_mb: float = 300.0
    # auto: each window's buffers are mapped and unmapped whole, so a file's growth does not depend
    # on what the worker ran before (docs/DESIGN.md gives the figures)
    mmap_threshold: int | str | None = field(default="auto", metadata={"kind": "size_or_auto"})
    # false: each utterance in a window of its own (better word boundaries on real speech); true: a
    # span's utterances forced together in one window (about 4-5x less encoder work on a CPU)
    joint: bool = False


@dataclass
class SyntheticSettings(EngineDefaults):
    """A real worker whose work is a memory and CPU profile (tests and benchmarks)."""

    cold_baseline_mb: float = 60.0
    cold_intercept_mb: float = 16.0
    cold_mb_per_span_second: float = 2.0
    cold_mb_per_audio_second: float = 0.0
    cold_mb_per_media_mb: float = 60.0
    baseline_mb: float = 40.0  # the profile: memory held after READY ...
    mb_per_audio_second: float = 4.0  # ... grown per audio second of the file (or of the span) ...
    cpu_seconds_per_audio_second: float = 0.02  # ... over this much CPU work per audio second
    boot_seconds: float = 0.0  # how long its "model load" takes (boot timeout tests)
    probe_seconds: float = 0.0  # how long each READY probe takes besides its memory (a slow device)
    profile: str = "total"  # total: holds the whole file; streaming: one span at a time


@dataclass
class ServiceSettings:
    watch: str = ""  # inbox folder: keep running and align what lands there
    settle: float = _duration(10.0)  # a file (and its media) must be unchanged this long
    scan_interval: float = _duration(5.0)
    idle_retire: float = _duration(600.0)  # watch mode: retire workers idle this long
    control_socket: str = ""  # empty: <state_dir>/control.sock; "off" disables
    metrics_port: int = 0  # 0: no HTTP exposition
    metrics_host: str = "127.0.0.1"
    metrics_textfile: str = ""  # a .prom file for node_exporter's textfile collector


@dataclass
class SlurmSettings:
    """``--cluster slurm``: the dask-jobqueue SLURMCluster the supervisor starts and scales."""

    partition: str = ""  # empty: the cluster's default partition
    account: str = ""
    walltime: str = "01:00:00"
    cores: int = 1  # per job
    memory: int = _size(4 * 2**30)  # per job (the standard size)
    processes: int = 1  # worker processes per job (each one file at a time)
    max_jobs: int = 4  # standard and sized jobs at once
    max_memory: int | None = _size(None)  # largest job sized for one big file; empty: 4 x memory
    job_extra: list = field(default_factory=list, metadata={"kind": "list"})  # extra #SBATCH lines
    python: str = ""  # interpreter of the environment the jobs run; empty: this one
    scheduler_host: str = ""  # address the scheduler listens on; empty: Dask's choice
    local_directory: str = ""  # node-local scratch for the workers
    log_directory: str = ""  # where Slurm writes the jobs' output; empty: the submit folder


@dataclass
class ClusterSettings:
    """Where files run: empty = the local process pool; tcp://HOST:PORT, local or slurm = Dask."""

    address: str = ""
    local_workers: int = 0  # --cluster local: worker processes; 0 = run.workers
    local_memory: int | None = _size(None)  # --cluster local: per worker; empty: the limit / workers
    slurm: SlurmSettings = field(default_factory=SlurmSettings)


@dataclass
class Settings:
    run: RunSettings = field(default_factory=RunSettings)
    memory: MemorySettings = field(default_factory=MemorySettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    engine: dict[str, EngineDefaults] = field(
        default_factory=lambda: {
            "wav2vec": EngineDefaults(cold_baseline_mb=1100.0, cold_intercept_mb=200.0, cold_mb_per_span_second=12.0,
                                      mmap_threshold="auto"),
            "whisper": WhisperSettings(),
            "synthetic": SyntheticSettings(),
        }
    )
    # Not settable from files or the environment: what this invocation works on.
    corpus: list[Path] = field(default_factory=list)
    out: Path | None = None
    in_place: bool = False
    force: bool = False
    dry_run: bool = False
    config_path: Path | None = None
    resolved_model: Any = None  # supervisor.models.Resolved, set once before workers start

    # -- derived -----------------------------------------------------------------------------
    @property
    def engine_name(self) -> str:
        return self.run.engine

    @property
    def model_id(self) -> str:
        return self.run.model or DEFAULT_MODELS[self.run.engine]

    @property
    def model_location(self) -> str:
        """What workers load: the resolved store folder, folder or hub id."""
        return self.resolved_model.location if self.resolved_model is not None else self.model_id

    @property
    def model_store(self) -> Path:
        if self.run.model_store:
            return Path(self.run.model_store).expanduser()
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return Path(base) / "batchalign-supervise" / "models"

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache"

    @property
    def engine_settings(self) -> EngineDefaults:
        return self.engine[self.run.engine]

    @property
    def state_dir(self) -> Path:
        if self.run.state_dir:
            return Path(self.run.state_dir).expanduser()
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "batchalign-supervise"

    @property
    def telemetry_path(self) -> Path:
        return Path(self.run.telemetry).expanduser() if self.run.telemetry else self.state_dir / "telemetry.sqlite"

    @property
    def log_path(self) -> Path:
        if self.run.log_json:
            return Path(self.run.log_json).expanduser()
        if self.out is not None and not self.in_place:
            return self.out / "batchalign-supervise.log.jsonl"
        return self.state_dir / "logs" / "batchalign-supervise.log.jsonl"

    def max_workers(self, cores: int | None = None) -> int:
        if self.run.workers == "auto":
            return max(1, cores or os.cpu_count() or 1)
        return int(self.run.workers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("corpus",):
            d[key] = [str(p) for p in d[key]]
        for key in ("out", "config_path"):
            d[key] = str(d[key]) if d[key] is not None else None
        d["resolved_model"] = dataclasses.asdict(self.resolved_model) if self.resolved_model is not None else None
        return d


# -- layering ---------------------------------------------------------------------------------

def _convert(value: Any, f: dataclasses.Field, source: str) -> Any:
    kind = f.metadata.get("kind")
    try:
        if kind == "size":
            if value in (None, "", "auto"):
                return None
            return parse_size(value)
        if kind == "size_or_auto":
            if value in (None, ""):
                return None
            return "auto" if str(value).strip().lower() == "auto" else parse_size(value)
        if kind == "duration":
            return float(parse_duration(value))
        if kind == "list":
            if isinstance(value, str):
                return [line.strip() for line in value.replace(";", "\n").splitlines() if line.strip()]
            if isinstance(value, (list, tuple)):
                return [str(v) for v in value]
            raise ValueError(f"expected a list of strings, got {value!r}")
        target = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if target == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected true/false, got {value!r}")
        if target == "int":
            if isinstance(value, bool):
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if target == "float":
            return float(value)
        if target == "str":
            return str(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{source}: {exc}") from None
    return value


def _apply(obj: Any, values: Mapping[str, Any], source: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise SettingsError(f"{source}: unknown key {key!r}")
        if dataclasses.is_dataclass(getattr(obj, name)):
            if not isinstance(value, Mapping):
                raise SettingsError(f"{source}: [{key}] must be a table")
            _apply(getattr(obj, name), value, f"{source} [{key}]")
            continue
        setattr(obj, name, _convert(value, fields[name], f"{source} {key}"))


def apply_mapping(settings: Settings, data: Mapping[str, Any], source: str) -> None:
    """Apply a config.toml-shaped mapping (sections run/memory/service/engine.NAME)."""
    for section, values in data.items():
        if section == "engine":
            if not isinstance(values, Mapping):
                raise SettingsError(f"{source}: [engine] must hold tables like [engine.wav2vec]")
            for name, opts in values.items():
                if name not in settings.engine:
                    raise SettingsError(f"{source}: unknown engine [engine.{name}] (known: {', '.join(ENGINES)})")
                _apply(settings.engine[name], opts, f"{source} [engine.{name}]")
        elif section in ("run", "memory", "service", "cluster"):
            if not isinstance(values, Mapping):
                raise SettingsError(f"{source}: [{section}] must be a table")
            _apply(getattr(settings, section), values, f"{source} [{section}]")
        else:
            raise SettingsError(f"{source}: unknown section [{section}]")


def load_config_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: {exc}") from None


def env_mapping(environ: Mapping[str, str]) -> dict[str, Any]:
    """Translate BATCHALIGN_SUPERVISE_* variables into a config-shaped mapping."""
    out: dict[str, Any] = {}
    run_keys = {f.name for f in dataclasses.fields(RunSettings)}
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        rest = var[len(ENV_PREFIX):].lower()
        if rest.startswith("engine_") and rest != "engine":
            parts = rest.split("_", 2)
            if len(parts) == 3 and parts[1] in ENGINES:
                out.setdefault("engine", {}).setdefault(parts[1], {})[parts[2]] = value
                continue
        if rest.startswith("cluster_slurm_"):
            out.setdefault("cluster", {}).setdefault("slurm", {})[rest[len("cluster_slurm_"):]] = value
            continue
        for section in ("memory", "service", "cluster"):
            if rest.startswith(section + "_"):
                out.setdefault(section, {})[rest[len(section) + 1:]] = value
                break
        else:
            if rest in run_keys:
                out.setdefault("run", {})[rest] = value
            else:
                raise SettingsError(f"environment {var}: unknown setting")
    return out


def find_config(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    """--config, then $BATCHALIGN_SUPERVISE_CONFIG, then the user's config dir. Never whatever
    config.toml sits in the current folder: it may belong to any other program."""
    if explicit is not None:
        return explicit
    if environ.get(ENV_PREFIX + "CONFIG"):
        return Path(environ[ENV_PREFIX + "CONFIG"])
    xdg = Path(environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "batchalign-supervise" / "config.toml"
    return xdg if xdg.is_file() else None


def load_settings(
    *,
    config: Path | None = None,
    environ: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from the four layers; ``cli`` is config-shaped (only options the user gave)."""
    environ = os.environ if environ is None else environ
    settings = Settings()
    path = find_config(config, environ)
    if path is not None:
        apply_mapping(settings, load_config_file(path), str(path))
        settings.config_path = path
    apply_mapping(settings, env_mapping(environ), "environment")
    if cli:
        apply_mapping(settings, cli, "command line")
    validate(settings)
    return settings


def reload_settings(current: Settings, environ: Mapping[str, str] | None = None,
                    cli: Mapping[str, Any] | None = None) -> Settings:
    """Re-read config.toml and the environment (SIGHUP); the command line still wins."""
    new = load_settings(config=current.config_path, environ=environ, cli=cli)
    for name in ("corpus", "out", "in_place", "force", "dry_run"):
        setattr(new, name, copy.copy(getattr(current, name)))
    return new


def validate(s: Settings) -> None:
    if s.run.engine not in ENGINES:
        raise SettingsError(f"engine {s.run.engine!r} is not one of {', '.join(ENGINES)}")
    if s.run.dtype not in ("fp32", "bf16", "fp16"):
        raise SettingsError(f"dtype {s.run.dtype!r} is not one of fp32, bf16, fp16")
    if s.run.workers != "auto":
        try:
            if int(s.run.workers) < 1:
                raise ValueError
        except ValueError:
            raise SettingsError(f"workers {s.run.workers!r} must be a positive integer or 'auto'") from None
    if s.run.max_attempts < 1:
        raise SettingsError("max_attempts must be at least 1")
    m = s.memory
    if not (0 < m.resume_below < m.admit_below <= m.pause_above <= m.kill_above):
        raise SettingsError(
            "memory bands must satisfy 0 < resume_below < admit_below <= pause_above <= kill_above "
            f"(got {m.resume_below}, {m.admit_below}, {m.pause_above}, {m.kill_above})")
    if m.poll_interval <= 0:
        raise SettingsError("memory poll_interval must be positive")
    if not 0.5 <= m.quantile < 1:
        raise SettingsError("memory quantile must be in [0.5, 1)")
    if s.run.progress not in ("auto", "on", "off"):
        raise SettingsError("progress must be auto, on or off")
    c = s.cluster.address
    if c and c not in ("local", "slurm") and not c.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        raise SettingsError(f"cluster {c!r} is not tcp://HOST:PORT, local or slurm")
    if s.cluster.slurm.max_jobs < 1 or s.cluster.slurm.cores < 1 or s.cluster.slurm.processes < 1:
        raise SettingsError("[cluster.slurm] max_jobs, cores and processes must be at least 1")
    if s.run.start_method not in ("auto", "spawn", "zygote"):
        raise SettingsError(f"start_method {s.run.start_method!r} is not one of auto, spawn, zygote")
    if s.run.model_server not in ("auto", "on", "off"):
        raise SettingsError(f"model_server {s.run.model_server!r} is not one of auto, on, off")
