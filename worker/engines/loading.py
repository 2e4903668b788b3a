"""Load Hugging Face models and processors once per worker, with weights shared between workers.

Every loading failure becomes a one-line :class:`BootError` that names the model and says what to do:
the worker exits with ``EXIT_BOOT_ERROR`` and the supervisor stops instead of respawning workers
that would fail the same way.

Shared weights: on the CPU in the checkpoint's own dtype, the parameters are left as views into a
private (copy-on-write) memory map of the ``.safetensors`` files. Pages that are only read stay in
the page cache, so N workers on one machine hold one copy of the weights and each worker's private
memory (USS) is only its activations. ``model._shared_weights`` says whether this held for every
parameter; ``model._shared_bytes`` / ``model._private_bytes`` give the split.
"""

from __future__ import annotations


import json
import logging
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import torch

from worker.engines.base import BootError
from worker.selfmem import libc

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Parameters a checkpoint may legitimately lack (pretraining-only tensors).
_OPTIONAL_KEYS = re.compile(r"(^|\.)masked_spec_embed$")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def configure_threads(threads: int | None) -> None:
    """Cap torch's intra-op threads so the pool's workers together never oversubscribe the cores."""
    if threads is None or threads <= 0:
        return
    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already fixed once parallel work has started; the intra-op cap is what matters


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise BootError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def _looks_local(model_id: str) -> bool:
    return (
        model_id.startswith(("/", "./", "../", "~"))
        or os.path.isabs(model_id)
        or os.path.exists(os.path.expanduser(model_id))
        or model_id.count("/") > 1
    )


def _hub_offline() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return True
    return False


def _boot_error(model_id: str, exc: BaseException, what: str = "model") -> BootError:
    """Turn whatever transformers / huggingface_hub raised into one actionable line."""
    text = " ".join(str(exc).split())
    low = text.lower()
    hint = "pass --model with a hub id or a local folder saved with save_pretrained"
    if "couldn't connect" in low or "cached files" in low or "offline" in low or "connection" in low:
        reason = (
            "not in the local Hugging Face cache and the hub is unreachable"
            if not _hub_offline()
            else "not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        )
        hint = "download it once with network access or pass --model /path/to/local/folder"
    elif "not a valid json" in low:
        reason = "its config.json is not valid JSON"
        hint = "re-save the model with save_pretrained or download it again"
    elif "is not a local folder" in low or "repository not found" in low or "404" in low:
        reason = "no such model on the Hugging Face hub and no such local folder"
    elif "does not appear to have a file named" in low or "no file named" in low:
        reason = f"the folder or repository has no {what} files ({text[:160]})"
    elif isinstance(exc, (json.JSONDecodeError, ValueError, KeyError)):
        reason = f"bad {what} configuration ({text[:160]})"
    else:
        reason = text[:200] or type(exc).__name__
    return BootError(f"cannot load {what} {model_id!r}: {reason}; {hint}")


def _pretrained_call(fn: Any, model_id: str, what: str, **kwargs: Any) -> Any:
    """Call a ``from_pretrained`` cache-first, so booting N workers never waits on the network.

    A model already in the local cache loads with ``local_files_only``; only when it is missing and
    the hub is allowed is the hub asked (which downloads it into the cache).
    """
    local = _looks_local(model_id)
    if local:
        path = Path(os.path.expanduser(model_id))
        if not path.is_dir():
            raise BootError(
                f"cannot load {what} {model_id!r}: no such folder; pass --model with an existing "
                "folder saved with save_pretrained or a Hugging Face hub id"
            )
        model_id = str(path)
    try:
        return fn(model_id, local_files_only=True, **kwargs)
    except BootError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is a boot failure, worded below
        if local or _hub_offline():
            raise _boot_error(model_id, exc, what) from None
    try:
        return fn(model_id, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise _boot_error(model_id, exc, what) from None


def load_config(model_cls: Any, model_id: str, **kwargs: Any) -> Any:
    """The model's config, checked to be of the type ``model_cls`` expects."""
    config = _pretrained_call(model_cls.config_class.from_pretrained, model_id, "model", **kwargs)
    want = getattr(model_cls.config_class, "model_type", None)
    got = getattr(config, "model_type", None)
    if want and got and want != got:
        raise BootError(
            f"cannot load model {model_id!r}: it is a {got!r} model, but this engine needs a "
            f"{want!r} model ({model_cls.__name__}); pick a model made for this engine"
        )
    return config


def load_processor(processor_cls: Any, model_id: str, **kwargs: Any) -> Any:
    """A processor / tokenizer / feature extractor, with the same errors and cache rules as models."""
    return _pretrained_call(processor_cls.from_pretrained, model_id, "processor", **kwargs)


def load_pretrained(
    model_cls: Any,
    model_id_or_path: str,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype = "fp32",
    quantize_int8: bool = False,
    share_weights: bool = True,
    threads: int | None = None,
    strict: bool = True,
    **kwargs: Any,
) -> Any:
    """Load ``model_cls`` from a hub id or local folder, ready for inference.

    ``share_weights=False`` copies the weights into private memory (one copy per worker).
    ``kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation="eager"``). ``strict`` refuses a
    checkpoint that lacks weights the model needs (e.g. a pretraining checkpoint without a CTC
    head), which would otherwise run with random weights and produce garbage alignments.
    """
    configure_threads(threads)
    torch_dtype = resolve_dtype(dtype)
    if quantize_int8 and device != "cpu":
        raise BootError(f"cannot load model {model_id_or_path!r}: int8 quantization runs on the CPU only; drop --int8 or use --device cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BootError(f"cannot load model {model_id_or_path!r} on {device}: no CUDA device is available; use --device cpu")
    config = load_config(model_cls, model_id_or_path)
    try:
        model, info = _pretrained_call(
            model_cls.from_pretrained,
            model_id_or_path,
            "model",
            config=config,
            dtype=torch_dtype,
            output_loading_info=True,
            **kwargs,
        )
    except BootError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _boot_error(model_id_or_path, exc) from None
    missing = [k for k in (info or {}).get("missing_keys", []) if not _OPTIONAL_KEYS.search(k)]
    if strict and missing:
        shown = ", ".join(sorted(missing)[:3]) + (" ..." if len(missing) > 3 else "")
        raise BootError(
            f"cannot load model {model_id_or_path!r}: the checkpoint lacks {len(missing)} weights "
            f"the model needs ({shown}); use a checkpoint fine-tuned for this task"
        )
    model.eval()
    model.requires_grad_(False)

    model._shared_weights = False
    model._shared_bytes = 0
    model._private_bytes = _param_bytes(model)
    if device != "cpu":
        model.to(device)
        log.debug("model %s on %s: weights are private device memory", model_id_or_path, device)
    elif quantize_int8:
        # Copy out of the file mapping first and quantize in place: the fp32 Linear weights are
        # then freed instead of staying resident (a copying quantize_dynamic keeps both).
        _make_private(model)
        with warnings.catch_warnings():
            # Deprecated in favour of torchao, which is not part of this stack; still works here.
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
        model.eval()
        _trim_heap()
        model._shared_weights = False
        model._shared_bytes = 0
        model._private_bytes = _param_bytes(model)
        log.debug("model %s quantized to int8: weights are private", model_id_or_path)
    elif share_weights:
        files = _checkpoint_files(model_id_or_path)
        if not files:
            log.debug("model %s has no safetensors weights: loaded privately", model_id_or_path)
        else:
            _share_from_safetensors(model, files)
            log.debug(
                "model %s: %d MiB shared from safetensors, %d MiB private",
                model_id_or_path,
                model._shared_bytes >> 20,
                model._private_bytes >> 20,
            )
    else:
        _make_private(model)
        log.debug("model %s: weights copied into private memory", model_id_or_path)
    return model


def trim_heap() -> None:
    """Return freed heap pages to the OS: glibc keeps them otherwise and RSS only ever grows."""
    try:
        libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _trim_heap() -> None:
    """Collect, then trim: after loading, so the READY baseline is what the worker really keeps."""
    import gc

    gc.collect()
    trim_heap()


def release_memory(device: str) -> None:
    """Between files: collect, trim the heap and empty the CUDA cache, so the next file starts from
    the READY baseline and the supervisor's USS readings stay honest."""
    _trim_heap()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _make_private(model: torch.nn.Module) -> None:
    """Copy every tensor out of any file mapping: no dependence on the checkpoint file (or the
    page cache) after loading, at the price of one private copy per worker."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
    model._shared_weights = False
    model._shared_bytes = 0
    model._private_bytes = _param_bytes(model)


def _param_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _checkpoint_files(model_id: str) -> list[Path]:
    """The ``.safetensors`` files of a local folder or of a cached hub model (never downloads)."""
    if _looks_local(model_id):
        folder = Path(os.path.expanduser(model_id))
    else:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(model_id, local_files_only=True, allow_patterns=["*.safetensors", "*.json"])
            )
        except Exception:  # noqa: BLE001 - not sharing is a valid outcome
            return []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / n for n in names if (folder / n).is_file()]
        except (OSError, ValueError, KeyError):
            return []
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def _file_mappings(paths: list[Path]) -> list[tuple[int, int]]:
    """Address ranges where this process maps any of ``paths`` (from ``/proc/self/maps``)."""
    wanted = {str(p.resolve()) for p in paths}
    ranges = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() in wanted:
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return ranges


def _mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors viewing a copy-on-write memory map of ``path``; nothing is read until used."""
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    size = path.stat().st_size
    storage = torch.UntypedStorage.from_file(str(path), False, size)
    base = 8 + header_len
    out: dict[str, torch.Tensor] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dt = _SAFETENSORS_DTYPES.get(meta["dtype"])
        if dt is None:
            continue
        begin, end = meta["data_offsets"]
        itemsize = torch.empty((), dtype=dt).element_size()
        if (base + begin) % itemsize:
            continue
        t = torch.empty(0, dtype=dt)
        t.set_(storage, (base + begin) // itemsize, tuple(meta["shape"]))
        out[name] = t
    return out


def _share_from_safetensors(model: torch.nn.Module, files: list[Path]) -> None:
    """Make every parameter a view into the safetensors memory map, without copying.

    transformers usually leaves CPU weights memory-mapped already; that is checked against
    ``/proc/self/maps``. Parameters that were copied (a conversion, another transformers version)
    are swapped for mmap views when the file holds the same name, shape, dtype and values.
    """
    ranges = _file_mappings(files)

    def mapped(t: torch.Tensor) -> bool:
        p = t.data_ptr()
        return any(lo <= p < hi for lo, hi in ranges)

    named = dict(model.named_parameters(remove_duplicate=True))
    pending = {n: p for n, p in named.items() if not mapped(p)}
    if pending:
        mm: dict[str, torch.Tensor] = {}
        for f in files:
            try:
                mm.update(_mmap_safetensors(f))
            except (OSError, ValueError, RuntimeError, struct.error) as exc:
                log.debug("cannot memory-map %s: %s", f, exc)
        for name, param in list(pending.items()):
            src = mm.get(name)
            if src is None or src.shape != param.shape or src.dtype != param.dtype:
                continue
            if not torch.equal(src, param.data):
                continue
            new = torch.nn.Parameter(src, requires_grad=False)
            # Re-point every alias (tied weights) of this parameter at the shared view.
            for mod in model.modules():
                for key, val in list(mod._parameters.items()):
                    if val is param:
                        mod._parameters[key] = new
            pending.pop(name)
    shared = sum(p.numel() * p.element_size() for n, p in named.items() if n not in pending)
    total = _param_bytes(model)
    model._shared_bytes = shared
    model._private_bytes = max(total - shared, 0)
    model._shared_weights = not pending and shared > 0
    if pending:
        log.debug("weights kept private: %s", ", ".join(sorted(pending)[:5]))
