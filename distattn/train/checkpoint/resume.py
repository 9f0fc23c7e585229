"""What a resume must agree with, checked from a checkpoint's manifest before any tensor is read.

A checkpoint records the run it belongs to (:func:`run_info`): the model's shape, the data source,
the batch geometry (:func:`batch_geometry`: ``data.seq_len``, dp, cp, world size, tokens per step and
packing) and the learning-rate schedule's length. :func:`resume_config` refuses a config whose model or
data differ (one line naming the keys, their two values and a fix that works), or whose batch geometry
differs unless ``allow_reshape`` (:func:`reshaped`: the same data cut into other batches trains another
run), and fixes the schedule's length: ``train.lr_decay_steps`` is the first run's ``train.steps``
unless set, and is stored in every checkpoint, so ``--steps`` on a resume only moves where the run stops.
Setting ``lr_decay_steps`` to a different value on a resume changes the schedule from the next step on,
and says so.

:func:`resume_from` decides whether a run continues, for the CLI and the trainer alike.
:func:`check_room` refuses, before any rank starts, an output folder that cannot take a checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from ..config import RunConfig
from ..config.sections import ModelConfig
from .manifest import Manifest

# the model fields a checkpoint's tensors depend on (rope_theta and softcap change no shape: a
# resume may change them as it may change the learning rate)
SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "tie_embeddings",
              "attention_sinks")


def restarted() -> bool:
    """Whether torchrun restarted this worker (``--max-restarts``): it runs with the same arguments again."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def usable_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint under ``out/ckpt`` a resume would start from, or None (also when none
    verifies). Its structure only: naming it (on the way out after a signal, or on a torchrun restart)
    must not read every byte of it; the resume itself checks the checksums and says which one it takes."""
    from .dcp import newest_usable

    try:
        return newest_usable(Path(out) / "ckpt", checksums=False)
    except (ValueError, OSError):
        return None


def resume_from(out: Path, resume: bool | Path = False) -> bool | Path:
    """Whether the run writing into ``out`` continues, decided here only: ``resume`` when set (a
    checkpoint path the caller has verified, or True: the newest one that verifies, which the ranks
    agree on); else, on a torchrun restart, True when ``out`` holds a usable checkpoint (the restarted
    workers pick up the last one); else False, a new run."""
    if resume or not restarted():
        return resume
    return usable_checkpoint(out) is not None


def run_info(cfg: RunConfig) -> dict[str, Any]:
    """What a checkpoint of ``cfg`` records about its run (``manifest.json``'s ``run``)."""
    return {"model": {k: getattr(cfg.model, k) for k in SHAPE_KEYS},
            "data": {"source": cfg.data.source, "path": cfg.data.path, "tokenizer": cfg.data.tokenizer,
                     "blend": [dataclasses.asdict(b) for b in cfg.data.blend] if cfg.data.blend else None,
                     "identity": _data_identities(cfg)},
            "geometry": batch_geometry(cfg),
            "lr_decay_steps": schedule_steps(cfg)}


# the batch geometry a checkpoint records: manifest key -> the name a message gives it (a config key
# where there is one). The scheduler, nano-batches and dp_mode are not in it: they change no batch
GEOMETRY = {"seq_len": "data.seq_len", "dp": "parallel.dp", "cp": "parallel.cp", "world_size": "world size",
            "tokens_per_step": "tokens/step", "packing": "data.packing"}


def batch_geometry(cfg: RunConfig) -> dict[str, Any]:
    """How ``cfg`` cuts the data into steps, as the run resolves it (``cp: auto`` as its fixed choice's
    ``world_size / dp``, ``data.packing`` unset as its default): what a resume must keep to be the same run."""
    p = cfg.parallel
    return {"seq_len": cfg.data.seq_len, "dp": p.dp, "cp": p.fixed_cp, "world_size": cfg.world_size,
            "tokens_per_step": p.dp * cfg.data.seq_len, "packing": cfg.packing}


def reshaped(cfg: RunConfig, found: Manifest) -> list[str]:
    """The geometry keys (:data:`GEOMETRY`'s names) in which ``cfg`` differs from the checkpoint ``found``;
    a checkpoint saved before the geometry was recorded (or a key it lacks) differs in nothing."""
    saved = found.run.get("geometry") or {}
    now = batch_geometry(cfg)
    return [GEOMETRY[k] for k in GEOMETRY if k in saved and saved[k] != now[k]]


def reshape_line(cfg: RunConfig, found: Manifest) -> str | None:
    """The changed geometry in words -- ``the checkpoint was trained with data.seq_len 8192 (tokens/step
    8192); this run has data.seq_len 4096 (tokens/step 4096)`` -- or None when nothing changed."""
    changed = reshaped(cfg, found)
    if not changed:
        return None
    keys = [k for k in GEOMETRY if GEOMETRY[k] in changed]
    return (f"the checkpoint (step {found.step}) was trained with {geometry_words(found.run['geometry'], keys)}; "
            f"this run has {geometry_words(batch_geometry(cfg), keys)}")


def geometry_words(geometry: dict, keys=tuple(GEOMETRY)) -> str:
    """``keys`` of a recorded batch geometry in words, tokens per step last in brackets: ``data.seq_len
    8192, parallel.dp 2 (tokens/step 16384)``."""
    shown = ", ".join(f"{GEOMETRY[k]} {geometry[k]}" for k in keys if k != "tokens_per_step" and k in geometry)
    tokens = f"tokens/step {geometry['tokens_per_step']}" if "tokens_per_step" in geometry else ""
    return f"{shown} ({tokens})" if shown and tokens else shown or tokens


def _data_identities(cfg: RunConfig) -> list:
    """Each source's identity (:mod:`..data.identity`), one per blend entry, or the one source's."""
    from ..data.identity import data_identity

    entries = cfg.data.blend if cfg.data.source == "blend" else [cfg.data]
    return [data_identity(e.source, e.path) for e in entries]


def _data_change(cfg: RunConfig, saved: list | None, now: list, say: Callable[[str], Any] | None) -> str | None:
    """What differs in the data's identity, in words, or None; a checkpoint without one only warns."""
    from ..data.identity import identity_change

    if saved is None:
        if say is not None and any(now):
            say("the checkpoint records no data identity (saved before it was recorded): the data it resumes "
                "onto cannot be checked against what it trained on")
        return None
    entries = cfg.data.blend if cfg.data.source == "blend" else [cfg.data]
    for i, (entry, old, new) in enumerate(zip(entries, saved, now)):
        change = identity_change(old, new)
        if change is not None:
            key = f"data.blend[{i}].path" if cfg.data.source == "blend" else "data.path"
            return f"{key} {entry.path} holds other data than the checkpoint trained on: {change}"
    return None


def schedule_steps(cfg: RunConfig) -> int:
    """The cosine schedule's length of a new run: ``train.lr_decay_steps``, else ``train.steps``."""
    return cfg.train.lr_decay_steps or cfg.train.steps


def recorded_model_problem(found: Manifest) -> str | None:
    """Why no config can resume ``found`` (``ckpt verify`` says it too), or None: a model recorded without a
    shape key (or none: ``run = {}``), or with a value of the wrong type (``dim: '64'``), cannot be shown
    to match any config, and no config value fixes that; every checkpoint the trainer writes records all
    of them, typed."""
    saved = found.run.get("model") if isinstance(found.run, dict) else None
    saved = saved if isinstance(saved, dict) else {}
    if missing := [f"model.{k}" for k in SHAPE_KEYS if k not in saved]:
        return f"its manifest records no {', '.join(missing)}, so the config's model cannot be checked against it"
    defaults = ModelConfig()
    wrong = [f"model.{k} as {saved[k]!r:.40}" for k in SHAPE_KEYS
             if type(saved[k]) is not type(getattr(defaults, k))]   # (bool is not int here)
    if wrong:
        return f"its manifest records {', '.join(wrong)}, not the type of a model's value"
    return None


def resume_config(cfg: RunConfig, found: Manifest, say: Callable[[str], Any] | None = None,
                  allow_reshape: bool = False) -> RunConfig:
    """``cfg`` with the schedule length a resume from the checkpoint ``found`` trains with.

    ``ValueError`` when the config's model shape or data differ from the checkpoint's, or its batch
    geometry does (:func:`reshaped`) and not ``allow_reshape`` (``--allow-reshape``; the trainer then
    says what changed, once, and marks the first resumed step's metrics)."""
    run = found.run
    saved_model, saved_data = run.get("model") or {}, run.get("data") or {}
    if problem := recorded_model_problem(found):
        raise ValueError(f"refusing to resume step {found.step}: {problem}; start a new run with --out NEW_FOLDER "
                         f"(or --overwrite)")
    changed = [f"model.{k} {getattr(cfg.model, k)!r} (checkpoint: {saved_model[k]!r})"
               for k in SHAPE_KEYS if k in saved_model and saved_model[k] != getattr(cfg.model, k)]
    data = run_info(cfg)["data"]   # the config's, as a checkpoint records it (older ones lack some keys)
    changed += [f"data.{k} {data[k]!r} (checkpoint: {saved_data[k]!r})"
                for k in data if k in saved_data and saved_data[k] != data[k] and k != "identity"]
    if not changed and (change := _data_change(cfg, saved_data.get("identity"), data["identity"], say)):
        raise ValueError(f"refusing to resume step {found.step}: {change}; resume with the data it was saved "
                         f"with, or start a new run with --out NEW_FOLDER (or --overwrite)")
    if changed:
        raise ValueError(f"the config differs from the run it resumes (step {found.step}): {'; '.join(changed)}. "
                         f"Set these back to the checkpoint's values to continue that run, or start a new one "
                         f"with --out NEW_FOLDER (or --overwrite)")
    if not allow_reshape and (line := reshape_line(cfg, found)):
        raise ValueError(f"--resume: {line}: resuming would train a different run (other batches of the data); "
                         f"set these back, or pass --allow-reshape to continue anyway")
    saved = run.get("lr_decay_steps")
    wanted = cfg.train.lr_decay_steps
    if wanted is not None and saved is not None and wanted != saved and say is not None:
        say(f"train.lr_decay_steps {wanted} replaces the checkpoint's {saved}: the learning-rate schedule "
            f"changes from step {found.step + 1} on")
    steps = wanted or saved or cfg.train.steps
    return cfg.replace(train={"lr_decay_steps": steps})


def check_room(cfg: RunConfig, ckpt_root: Path, newest: Manifest | None) -> None:
    """``ValueError`` unless ``ckpt_root`` can take a checkpoint: writable, with the room a save asks for
    (:func:`~.checkpoint.room_needed`) for one the size of ``newest`` (else an estimate from the model:
    fp32 weights and AdamW's two moments)."""
    from .dcp import room_needed
    from .disk import advice, disk_name

    ckpt_root = Path(ckpt_root)
    folder = next((p for p in (ckpt_root, *ckpt_root.parents) if p.exists()), Path("."))
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{folder} is not writable, so no checkpoint could be saved; make it writable or pass "
                         f"--out to another folder")
    need = room_needed(newest.total_bytes if newest is not None else 12 * cfg.model.shape.params)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise ValueError(f"{folder} has {free / 2**20:,.1f} MiB free but a checkpoint of this model takes about "
                         f"{need / 2**20:,.1f} MiB with its margin (on {disk_name(folder)})"
                         + advice(ckpt_root, cfg.train.keep_last))
