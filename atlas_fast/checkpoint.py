"""Atomic, self-describing training checkpoints.

Layout of ``output_dir/checkpoint-<step>/``::

    config.json, model.safetensors ...   model.save_pretrained (adapter files for PEFT models)
    tokenizer.json, ...                  tokenizer.save_pretrained (when a tokenizer is given)
    trainer_state.pt                     optimizer / scheduler / sampler state, RNG, step, ...
    meta.json                            written last: identity fingerprint + file sizes

Atomicity: everything is written to a hidden sibling ``.tmp-checkpoint-<step>``,
fsynced, then renamed into place, so a crash at any point leaves either the
complete new checkpoint or none at all. ``meta.json`` doubles as the completion
marker: discovery only trusts folders whose meta lists files that exist with the
recorded sizes. Hidden ``.tmp-*`` folders are ignored by discovery and removed by
the next save.

A single writer (the main process) is assumed; other ranks should not call
:func:`save_checkpoint`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "check_checkpoint",
    "check_output_dir",
    "checkpoint_path",
    "prepare_output_dir",
    "resume_target",
    "latest_checkpoint",
    "list_checkpoints",
    "capture_rng_state",
    "restore_rng_state",
    "model_fingerprint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
META_FILE = "meta.json"
STATE_FILE = "trainer_state.pt"
FORMAT_NAME = "atlas-fast-checkpoint"
FORMAT_VERSION = 1

_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")
# Config attributes that identify an architecture; read through `get_text_config()` so
# that multimodal wrappers are compared on their language model.
_FINGERPRINT_ATTRS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """Snapshot of every global RNG the training loop may draw from.

    The numpy state is stored as plain ints so the result loads with
    ``torch.load(weights_only=True)``.
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; missing entries are left untouched."""
    if "python" in state:
        version, internal, gauss = state["python"]
        # Serialization may turn the inner tuple into a list; `random.setstate` needs a tuple.
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        _restore_numpy_rng(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        _restore_cuda_rng(list(state["cuda"]))


def _restore_numpy_rng(saved: Mapping[str, Any]) -> None:
    np.random.set_state(
        {
            "bit_generator": saved["bit_generator"],
            "state": {"key": np.asarray(saved["key"], dtype=np.uint32), "pos": int(saved["pos"])},
            "has_gauss": int(saved["has_gauss"]),
            "gauss": float(saved["gauss"]),
        }
    )


def _restore_cuda_rng(saved: list[torch.Tensor]) -> None:
    count = torch.cuda.device_count()
    if len(saved) != count:
        # Resuming on a different GPU count is legitimate; restore what lines up.
        warnings.warn(
            f"Checkpoint holds CUDA RNG state for {len(saved)} device(s) but {count} are visible; "
            "restoring the overlapping devices only.",
            RuntimeWarning,
            stacklevel=3,
        )
    for index, device_state in enumerate(saved[:count]):
        torch.cuda.set_rng_state(device_state.cpu(), device=index)


# --------------------------------------------------------------------------- model identity


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _peft_model_class() -> type | None:
    try:
        from peft import PeftModel
    except ImportError:
        return None
    return PeftModel


def _is_peft(model: torch.nn.Module) -> bool:
    peft_class = _peft_model_class()
    return peft_class is not None and isinstance(model, peft_class)


def _adapter_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    adapters = {}
    for name, config in sorted(model.peft_config.items()):
        targets = getattr(config, "target_modules", None)
        adapters[name] = {
            "peft_type": str(getattr(config, "peft_type", None)),
            "r": getattr(config, "r", None),
            "lora_alpha": getattr(config, "lora_alpha", None),
            "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        }
    return adapters


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """Small, JSON-serializable description used to refuse loading into a different model."""
    model = _unwrap(model)
    is_peft = _is_peft(model)
    base = model.get_base_model() if is_peft else model
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    fingerprint: dict[str, Any] = {"model_class": type(base).__name__, "is_peft": is_peft}
    for attr in _FINGERPRINT_ATTRS:
        fingerprint[attr] = getattr(text_config, attr, None)
    if is_peft:
        fingerprint["adapters"] = _adapter_fingerprint(model)
    return json.loads(json.dumps(fingerprint, default=str))


def _fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [
        f"{key}: checkpoint={saved.get(key)!r}, model={current.get(key)!r}"
        for key in keys
        if saved.get(key) != current.get(key)
    ]


# --------------------------------------------------------------------------- filesystem helpers


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Persist directory entries (new files, renames); a no-op where unsupported (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(directory) / name)
        _fsync_dir(Path(directory))


def _file_sizes(root: Path) -> dict[str, int]:
    return {
        path.relative_to(root).as_posix(): path.stat().st_size
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != META_FILE
    }


def _remove_tree(path: Path) -> None:
    """Delete ``path`` without ever exposing a half-deleted checkpoint under its real name."""
    if not path.exists():
        return
    if not path.name.startswith(TMP_PREFIX):
        doomed = path.with_name(f"{TMP_PREFIX}delete-{path.name}")
        shutil.rmtree(doomed, ignore_errors=True)
        path.rename(doomed)
        path = doomed
    shutil.rmtree(path, ignore_errors=True)


def _step_of(path: Path) -> int | None:
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- discovery


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT_NAME else None


def _incomplete_reason(path: Path) -> str | None:
    """Why ``path`` is not a usable checkpoint, or None when it is complete."""
    if not path.is_dir():
        return f"checkpoint folder {path} does not exist"
    meta = _read_meta(path)
    if meta is None:
        return f"{path} has no valid {META_FILE} (save was interrupted or this is not an atlas-fast checkpoint)"
    for name, size in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{path} is incomplete: {name} is missing"
        if file.stat().st_size != size:
            return f"{path} is incomplete: {name} has {file.stat().st_size} bytes, expected {size}"
    return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (step, path)
        for path in output_dir.iterdir()
        if (step := _step_of(path)) is not None and _incomplete_reason(path) is None
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


# --------------------------------------------------------------------------- saving


def _materialize_state(trainer_state: Mapping[str, Any]) -> dict[str, Any]:
    """Call ``state_dict()`` on stateful values (optimizer, scheduler, sampler) and add RNG."""
    state = {
        key: value.state_dict() if callable(getattr(value, "state_dict", None)) else value
        for key, value in trainer_state.items()
    }
    state.setdefault("rng", capture_rng_state())
    return state


@contextlib.contextmanager
def _quiet_transformers_progress() -> Iterator[None]:
    """Hide the per-shard "Writing model shards" bar, which garbles the trainer's own bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_model(directory: Path, model: torch.nn.Module) -> None:
    kwargs: dict[str, Any] = {}
    parameters = inspect.signature(model.save_pretrained).parameters
    if "save_original_format" in parameters:
        # Keep in-memory parameter names: transformers may otherwise revert its
        # weight conversions, and the in-place load below would not find the keys.
        kwargs["save_original_format"] = False
    with _quiet_transformers_progress():
        model.save_pretrained(str(directory), **kwargs)


def _write_trainer_state(directory: Path, state: Mapping[str, Any]) -> None:
    torch.save(dict(state), directory / STATE_FILE)


def _write_meta(directory: Path, step: int, model: torch.nn.Module) -> None:
    """Written last: its presence (with matching file sizes) marks the checkpoint complete."""
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "step": int(step),
        "model_class": type(_unwrap(model)).__name__,
        "fingerprint": model_fingerprint(model),
        "files": _file_sizes(directory),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")


def _write_checkpoint(
    directory: Path, step: int, model: torch.nn.Module, tokenizer: Any, state: Mapping[str, Any]
) -> None:
    directory.mkdir(parents=True)
    _write_model(directory, _unwrap(model))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    _write_trainer_state(directory, state)
    _write_meta(directory, step, model)
    _fsync_tree(directory)


def _clean_stale(output_dir: Path) -> None:
    """Recover or remove leftovers of an interrupted save or prune."""
    for path in output_dir.iterdir():
        if not (path.is_dir() and path.name.startswith(TMP_PREFIX)):
            continue
        displaced = path.name.removeprefix(f"{TMP_PREFIX}old-")
        target = output_dir / displaced
        # A crash between "move the old copy aside" and "move the new one in" must not
        # lose that step: put the old copy back if nothing replaced it.
        if displaced != path.name and not target.exists() and _incomplete_reason(path) is None:
            path.rename(target)
            logger.warning("Restored %s from an interrupted re-save.", target)
            continue
        shutil.rmtree(path, ignore_errors=True)


def _install(tmp_dir: Path, final_dir: Path) -> None:
    """Move the finished ``tmp_dir`` to ``final_dir``, replacing an existing folder safely."""
    if final_dir.exists():
        # rename(2) cannot replace a non-empty directory, so swap in two renames.
        displaced = final_dir.with_name(f"{TMP_PREFIX}old-{final_dir.name}")
        shutil.rmtree(displaced, ignore_errors=True)
        final_dir.rename(displaced)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(displaced, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)


def _prune(output_dir: Path, keep: Path, save_total_limit: int | None) -> None:
    """Delete the oldest checkpoints beyond the limit; ``keep`` (just saved) always survives."""
    if save_total_limit is None:
        return
    others = [path for path in list_checkpoints(output_dir) if path != keep]
    budget = max(int(save_total_limit), 1) - 1
    doomed = others[: max(len(others) - budget, 0)]
    for path in doomed:
        logger.info("Deleting old checkpoint %s (save_total_limit=%s)", path, save_total_limit)
        _remove_tree(path)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    trainer_state: Mapping[str, Any],
    save_total_limit: int | None = None,
) -> Path:
    """Atomically write ``output_dir/checkpoint-<step>`` and return its path.

    ``trainer_state`` holds plain values (``global_step``, ``epoch``, ``log_history``)
    and state dicts (``optimizer``, ``scheduler``, ``sampler``); objects exposing
    ``state_dict()`` are converted automatically. RNG state is captured under
    ``"rng"`` unless the caller supplies it. ``save_total_limit=None`` keeps all
    checkpoints; any value keeps at least the one just written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(output_dir)
    final_dir = output_dir / f"{CHECKPOINT_PREFIX}{int(step)}"
    tmp_dir = output_dir / f"{TMP_PREFIX}{final_dir.name}"
    state = _materialize_state(trainer_state)
    try:
        _write_checkpoint(tmp_dir, step, model, tokenizer, state)
        _install(tmp_dir, final_dir)
    except BaseException:
        # Best effort: a hard kill skips this, and the next save's _clean_stale handles it.
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    try:
        _prune(output_dir, final_dir, save_total_limit)
    except OSError as exc:
        # The new checkpoint is complete; a leftover old one is not worth killing the run.
        logger.warning("Could not prune old checkpoints in %s: %s", output_dir, exc)
    return final_dir


# --------------------------------------------------------------------------- loading


def _load_safetensors_dir(path: Path, stem: str) -> dict[str, torch.Tensor]:
    """Load ``<stem>.safetensors`` or its sharded variant (``<stem>-0000x-of-0000y``)."""
    from safetensors.torch import load_file

    files = sorted(path.glob(f"{stem}*.safetensors"))
    if not files:
        raise ValueError(f"{path} contains no {stem}*.safetensors weights")
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        state_dict.update(load_file(str(file), device="cpu"))
    return state_dict


def _tied_aliases(model: torch.nn.Module) -> dict[str, set[str]]:
    """Map each parameter name to every name sharing the same tensor (tied weights)."""
    groups: dict[int, set[str]] = {}
    for name, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        groups.setdefault(id(tensor), set()).add(name)
    return {name: group for group in groups.values() for name in group}


def _load_full_weights(path: Path, model: torch.nn.Module) -> None:
    state_dict = _load_safetensors_dir(path, "model")
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"Weights in {path} do not fit the model: {exc}") from exc
    aliases = _tied_aliases(model)
    # save_pretrained drops tied copies (e.g. lm_head when tied to embed_tokens); those
    # are filled through the shared tensor, so only truly absent weights are an error.
    missing = [key for key in result.missing_keys if not (aliases.get(key, {key}) - {key}) & state_dict.keys()]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"Weights in {path} do not match the model: missing={missing[:10]}, "
            f"unexpected={list(result.unexpected_keys)[:10]}"
        )


def _load_peft_weights(path: Path, model: torch.nn.Module) -> None:
    from peft import set_peft_model_state_dict

    for adapter_name in model.peft_config:
        # PeftModel.save_pretrained puts the default adapter at the root and others in subfolders.
        adapter_dir = path if adapter_name == "default" else path / adapter_name
        state_dict = _load_safetensors_dir(adapter_dir, "adapter_model")
        result = set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(f"Adapter weights in {adapter_dir} do not match the model: unexpected={unexpected[:10]}")


def _load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state, read by torch's weights-only loader and nothing else: unpickling
    arbitrary objects would run code from the file, so a state it cannot read is refused."""
    file = path / STATE_FILE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
        why = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else type(exc).__name__)
        raise ValueError(
            f"Cannot load {file}: the weights-only loader refused it ({why}). atlas-fast never unpickles "
            "arbitrary objects; the state must hold only tensors and plain Python values."
        ) from exc


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives (whether or not it exists)."""
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{int(step)}"


def is_complete(path: str | Path) -> bool:
    return _incomplete_reason(Path(path)) is None


def check_checkpoint(path: str | Path, model: torch.nn.Module) -> None:
    """Raise ``ValueError`` unless ``path`` is a complete checkpoint written for ``model``'s
    architecture (the message lists each differing field)."""
    path = Path(path)
    reason = _incomplete_reason(path)
    if reason is not None:
        raise ValueError(f"Cannot load checkpoint: {reason}")
    meta = _read_meta(path)
    differences = _fingerprint_differences(meta.get("fingerprint", {}), model_fingerprint(model))
    if differences:
        raise ValueError(f"Checkpoint {path} was saved from a different model: " + "; ".join(differences))


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights into ``model`` in place and return the saved trainer-state dict.

    Raises ``ValueError`` when the folder is missing or incomplete, when it was written
    for a different model, or when a file cannot be read without unpickling.
    """
    state = load_trainer_state(path, model)
    load_weights(path, model)
    return state


def load_trainer_state(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """The saved trainer-state dict of a checkpoint checked to load into ``model``, which is left
    untouched: a caller can refuse the state before any weight changes."""
    path = Path(path)
    check_checkpoint(path, model)
    return _load_trainer_state(path)


def load_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into ``model`` in place (after `load_trainer_state` checked it)."""
    path = Path(path)
    target = _unwrap(model)
    if _is_peft(target):
        _load_peft_weights(path, target)
    else:
        _load_full_weights(path, target)


# --------------------------------------------------------------------------- the run folder

# What a run leaves in output_dir; any of them means the folder holds a run.
RUN_FILES = ("config.yaml", "metrics.jsonl", "final")
# The names of the run's other files (reward tables, teaching exchanges), one a line: a new run
# that overwrites this one clears them too, where appending to them would mix two runs.
RUN_FILE_LIST = "run_files.txt"


def note_run_files(output_dir: str | Path, names: Sequence[str]) -> None:
    """Add files of the run (plain names in `output_dir`) to the list that overwrite clears."""
    path = Path(output_dir) / RUN_FILE_LIST
    known = set(path.read_text(encoding="utf-8").split()) if path.exists() else set()
    new = [n for n in dict.fromkeys(names) if n not in known]
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("".join(n + "\n" for n in new))


def _listed_run_files(output_dir: Path) -> list[Path]:
    path = output_dir / RUN_FILE_LIST
    if not path.exists():
        return []
    names = path.read_text(encoding="utf-8").split()
    # Plain names only: a list edited by hand must not reach outside the folder.
    return [path] + [output_dir / n for n in names if Path(n).name == n and n not in (".", "..")]


def run_artifacts(output_dir: str | Path) -> list[Path]:
    """The files and folders of a previous run in ``output_dir`` (empty for a new folder)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [output_dir / name for name in RUN_FILES if (output_dir / name).exists()]
    found += sorted(p for p in output_dir.iterdir() if _step_of(p) is not None)
    return found


def check_output_dir(output_dir: str | Path, *, resuming: bool = False, overwrite: bool = False) -> None:
    """Raise ``ValueError`` naming ``output_dir`` when a new run may not start there."""
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ValueError(f"output_dir {output_dir} is a file, not a folder; choose another output_dir")
    found = run_artifacts(output_dir)
    if found and not resuming and not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(
            f"output_dir {output_dir} already holds a run ({names}); choose another output_dir, "
            "resume it with resume_from_checkpoint, or set overwrite_output_dir=True to replace it"
        )


def resume_target(output_dir: str | Path, where: str | Path | bool) -> Path:
    """The complete checkpoint that ``resume_from_checkpoint=where`` names, or ``ValueError``."""
    path = latest_checkpoint(output_dir) if where is True else Path(where)
    if path is None:
        raise ValueError(f"resume_from_checkpoint=True but {output_dir} holds no complete checkpoint")
    reason = _incomplete_reason(path)
    if reason is not None:
        raise ValueError(f"Cannot load checkpoint: {reason}")
    return path


def prepare_output_dir(output_dir: str | Path, *, resuming: bool = False, overwrite: bool = False) -> None:
    """Make ``output_dir`` ready for a run.

    A new run into a folder that holds another run (config, metrics, checkpoints, ``final/``)
    would replace its final model and config and append to its metrics, so it is refused
    unless the run resumes that run, or ``overwrite`` says to clear it first.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir, resuming=resuming, overwrite=overwrite)
    found = run_artifacts(output_dir)
    if found and not resuming:
        # Leftovers of the old run's interrupted saves too: the new run's first save would put them back.
        stale = sorted(p for p in output_dir.iterdir() if p.name.startswith(TMP_PREFIX))
        for path in (found + stale + _listed_run_files(output_dir)
                     + [output_dir / "metrics.png", output_dir / "completions", output_dir / "tensorboard"]):
            if path.is_dir():
                _remove_tree(path)
            elif path.exists():
                path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
