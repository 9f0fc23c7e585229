"""Run configs: YAML validated into frozen dataclasses (unknown keys are errors that name the key).

A config has four sections::

    model:    {dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size, tie_embeddings, rope_theta,
               attention_sinks, softcap}
    data:     {source: stdlib | tokens | megatron | hf | blend, path, tokenizer, blend, seq_len, seed,
               packing: stream | balanced, token_cap, verify, on_bad_document: fail | skip}
    parallel: {dp, cp, scheduler, ulysses_degree, head_groups, cad_pool, nano_batches,
               cad_backward: resend | keep | auto, plan_ahead,
               dp_mode: ddp | fsdp | hsdp | zero1, dp_shard, cpu_offload, backend, comm_dtype: fp8, timeout_s}
    train:    {steps, lr, min_lr, warmup_steps, weight_decay, grad_clip, log_every, ckpt_every, seed, out,
               dtype: fp32 | bf16, activation_checkpointing: none | full | selective | offload,
               loss_chunk, mlp_chunk, compile, peak_tflops, on_nonfinite: stop | skip_step, lr_decay_steps,
               deterministic, keep_last, profile_steps: [start, end]}

The file is a mapping of those sections (``{}`` for every default); a key written twice in one
mapping is refused, where YAML would keep the last one silently. The sections' dataclasses are
:mod:`.sections`', their checks :mod:`.validation`'s; this module reads a file into them and is
what the package :mod:`distattn.train.config` exports.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path

import yaml

from .overrides import check_key, merge_overrides, parse_overrides
from .sections import DataConfig, ModelConfig, ParallelConfig, RunConfig, TrainSection
from .validation import validate
from .yaml_strict import UniqueKeyLoader


def _section(cls, values, name):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"config section '{name}' must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ValueError(f"unknown config key '{name}.{key}'; known keys: {sorted(known)}")
    return cls(**values)


def load_config(path: str | Path, overrides: typing.Iterable[str] | typing.Mapping[str, dict] = ()) -> RunConfig:
    """Read and validate a YAML run config -- a file, or the name of one shipped with distattn (``tiny``:
    :mod:`distattn.configs`); ``ValueError`` (one line) for a missing file, bad YAML or values.
    ``overrides``: ``section.key=value`` words, or :func:`.overrides.parse_overrides`' mapping; merged into
    the file's sections before any value is checked, so both are checked alike."""
    if not isinstance(overrides, typing.Mapping):
        overrides = parse_overrides(overrides)
    path = Path(path)
    if not path.exists() and path.suffix == "" and len(path.parts) == 1:   # a built-in config's name
        from ... import configs

        path = configs.path(path.name) or path
    try:
        text = path.read_text()
    except FileNotFoundError:
        from ... import configs

        raise ValueError(f"config {path} does not exist; pass a YAML file or a built-in config: "
                         f"{', '.join(configs.names())}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"config {path} cannot be read: {exc}") from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)
    except RecursionError:
        raise ValueError(f"config {path}: nested too deeply to be a config (four sections of plain values)") \
            from None
    except yaml.YAMLError as exc:  # includes tags that would build Python objects
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"config {path}{where}: not valid YAML: {problem}") from None
    if raw is None:
        raise ValueError(f"config {path} is empty; a config is a mapping of sections (model, data, parallel, "
                         f"train): write {{}} in it for every default")
    if not isinstance(raw, dict):
        raise ValueError(f"config {path}: the top level is {type(raw).__name__} {raw!r:.40}, but a config is a "
                         f"mapping of sections (model, data, parallel, train)")
    sections = {"model": ModelConfig, "data": DataConfig, "parallel": ParallelConfig, "train": TrainSection}
    for section, values in raw.items():
        if section not in sections:
            close = difflib.get_close_matches(str(section), list(sections), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"config {path}: unknown config section '{section}'{hint} (known: {', '.join(sections)})")
        for key in values if isinstance(values, dict) else ():
            try:
                check_key(f"{section}.{key}")
            except ValueError as exc:   # (the same words, and closest key, as an override's)
                raise ValueError(f"config {path}: {str(exc).removeprefix(f'{section}.{key}: ')}") from None
    raw = merge_overrides(raw, overrides)
    return validate(RunConfig(**{name: _section(cls, raw.get(name), name) for name, cls in sections.items()}))
