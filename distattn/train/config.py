"""Run configs: YAML validated into frozen dataclasses (unknown keys are errors that name the key).

A config has four sections::

    model:    {dim, n_layers, n_heads, n_kv_heads, ffn_dim, vocab_size, tie_embeddings, rope_theta,
               attention_sinks, softcap}
    data:     {source: stdlib | tokens | megatron | hf | blend, path, tokenizer, blend, seq_len, seed}
    parallel: {dp, cp, scheduler, ulysses_degree, head_groups, cad_pool, nano_batches, dp_mode: ddp | fsdp,
               cpu_offload, backend, comm_dtype: fp8, timeout_s}
    train:    {steps, lr, min_lr, warmup_steps, weight_decay, grad_clip, log_every, ckpt_every, seed, out,
               dtype: fp32 | bf16, activation_checkpointing: none | full | selective | offload,
               loss_chunk, mlp_chunk, compile, peak_tflops, on_nonfinite: stop | skip_step, lr_decay_steps,
               deterministic}

The file is a mapping of those sections (``{}`` for every default); a key written twice in one
mapping is refused, where YAML would keep the last one silently.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..memory_model import CHECKPOINTING
from ..model_shape import ModelShape
from ..schedulers import PlanContext

DTYPES = ("fp32", "bf16")
ON_NONFINITE = ("stop", "skip_step")
# upper bounds of floats, past which a value is a typo rather than a setting: (key, most, why)
CEILINGS = (("parallel.timeout_s", 7 * 86400.0, "a week; a collective that waits longer has failed"),
            ("train.lr", 1.0, "AdamW moves each parameter by about lr per step"),
            ("train.weight_decay", 1.0, "AdamW shrinks each parameter by lr * weight_decay per step"),
            ("model.softcap", 1e4, "more than any attention score: no cap; leave it unset for none"),
            ("train.peak_tflops", 1e5, "100 PFLOP/s, far above any device's dense bf16 peak"))


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 688
    vocab_size: int = 256          # byte-level by default
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    # a learnable attention-sink logit per head and layer (gpt-oss; initialised to 0): every
    # softmax row gets an extra key of value 0 (distattn.attention's sinks=)
    attention_sinks: bool = False
    # attention logit soft-capping c: scores become c * tanh(score / c) (Gemma 2); unset: none
    softcap: float | None = None

    @property
    def shape(self) -> ModelShape:
        """The shape and its counts (parameters, MFU's FLOPs): what the simulator reads too."""
        return ModelShape(self.dim, self.n_layers, self.n_heads, self.n_kv_heads, self.ffn_dim, self.vocab_size,
                          self.tie_embeddings, self.attention_sinks)


SOURCES = ("stdlib", "tokens", "megatron", "hf", "blend")
_PATHS = {"tokens": "a directory from `distattn data prepare`, or the prefix of PATH.bin and PATH.idx.npy",
          "megatron": "the PREFIX of Megatron's PREFIX.bin and PREFIX.idx, as its --data-path",
          "hf": "a folder written by Dataset.save_to_disk, a .parquet file or a folder of them"}


@dataclass(frozen=True)
class BlendSource:
    """One source of ``data.blend``: documents of ``source`` at ``path`` (``tokenizer``: for ``hf``)
    drawn for a ``weight`` share of the tokens (weights are normalised: Megatron's ``--data-path
    0.3 A 0.7 B`` is ``[{path: A, weight: 0.3, source: megatron}, {path: B, weight: 0.7, ...}]``)."""
    path: str | None = None
    weight: float = 1.0
    source: str = "tokens"
    tokenizer: str | None = None


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"         # "stdlib": Python's standard library sources, one document per file
    # "tokens": a directory written by `distattn data prepare` (shards + index.json), or the prefix
    # of PATH.bin (flat tokens) + PATH.idx.npy (document offsets) of one token file;
    # "megatron": the prefix of a Megatron indexed dataset, PREFIX.bin + PREFIX.idx;
    # "hf": a Dataset.save_to_disk folder, a .parquet file or a folder of them
    path: str | None = None
    # hf: tokenize the 'text' column with this (bytes, a tokenizer.json or a folder holding one, a
    # Hugging Face tokenizer on disk); unset: the 'input_ids' column if there is one, else bytes
    tokenizer: str | None = None
    # source "blend": a list of {path, weight, source, tokenizer} (BlendSource), each document drawn
    # from the source whose token share lags its weight most (distattn/train/data.py)
    blend: tuple[BlendSource, ...] | None = None
    seq_len: int = 8192            # tokens per packed sequence (one per data-parallel rank and step)
    seed: int = 0


@dataclass(frozen=True)
class ParallelConfig:
    dp: int = 1
    cp: int = 4
    scheduler: str = "zigzag"
    ulysses_degree: int | None = None   # for scheduler: usp
    # For scheduler: ulysses, usp: move and compute each rank's query heads head_groups parts at a
    # time, so the buffers spanning the whole sequence hold 1/head_groups of them (ignored otherwise)
    head_groups: int = 1
    # For scheduler: cad with dp > 1: balance attention over all dp x cp ranks (one plan over the
    # pool of every replica's CP group, DistCA's "no DP stragglers") instead of inside each CP
    # group. Ignored otherwise -- like ulysses_degree for schedulers other than usp -- because it
    # defaults to on: refusing it elsewhere would make every non-cad config say false, and
    # `--scheduler zigzag` on a cad config would stop working. With dp == 1 the pool is the CP
    # group itself, so the plan would be the same but cost an extra exchange of document lengths.
    cad_pool: bool = True
    # 1 | 2: each micro-batch cut into this many nano-batches of whole documents, interleaved through
    # the blocks so that one's attention transfers hide behind the other's compute (DistCA's
    # ping-pong: distattn/pingpong.py); unset: the scheduler's default (2 for cad, 1 otherwise)
    nano_batches: int | None = None
    dp_mode: str = "ddp"                # "ddp" or "fsdp" (FSDP2 fully_shard)
    # FSDP2's CPUOffloadPolicy: the fp32 parameter shards, their gradients and AdamW's state live in
    # (pinned) host memory; each block's parameters come to the GPU for its forward and backward,
    # and the optimizer steps on the CPU. Needs dp_mode: fsdp; shards even on one rank
    cpu_offload: bool = False
    backend: str = "auto"               # attention kernel backend
    # fp8: attention's Q, K, V, out and dout cross ranks as float8_e4m3 with a scale per token and
    # head (~0.52x bf16's bytes; gradients keep their dtype: distattn/wire.py); unset: as they are
    comm_dtype: str | None = None
    timeout_s: float = 120.0            # collectives fail after this instead of hanging

    @property
    def nano_batch_count(self) -> int:
        """``nano_batches``, or the scheduler's default."""
        from ..schedulers import spec

        return self.nano_batches if self.nano_batches is not None else spec(self.scheduler).nano_batches

    @property
    def pools_replicas(self) -> bool:
        """Whether the trainer plans CAD over the pool of all dp x cp ranks (see ``cad_pool``)."""
        from ..schedulers import spec

        return self.cad_pool and spec(self.scheduler).pools and self.dp > 1


@dataclass(frozen=True)
class TrainSection:
    steps: int = 50
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 1
    ckpt_every: int = 25
    seed: int = 0
    out: str = "runs/tiny"
    # bf16: parameters are cast to bf16 for compute (FSDP2 MixedPrecisionPolicy; the DDP path
    # autocasts); master weights, gradient reduction and AdamW state stay fp32
    dtype: str = "fp32"
    # none | full (recompute each block in backward, attention included) | selective (recompute
    # the projections and MLP, keep what the distributed attention saved: no second attention) |
    # offload (full, the kept block inputs in pinned host memory, prefetched one block ahead in
    # backward: train/offload.py)
    activation_checkpointing: str = "none"
    # tokens per chunk of the fused output projection + cross-entropy (full logits never exist)
    loss_chunk: int = 2048
    # tokens per chunk of each block's MLP, forward and backward (its [tokens, ffn_dim]
    # intermediates never exist whole; train/tiled.py); 0: the whole shard at once
    mlp_chunk: int = 0
    # torch.compile each block, whole (attention is a custom op: distattn/ops.py; a graph break is
    # an error); checkpointing and offload stay eager around the compiled block
    compile: bool = False
    # the device's dense bf16 peak for MFU; unset: looked up from the GPU's name (CPU: n/a)
    peak_tflops: float | None = None
    # a step whose loss or gradient norm is not finite: stop (no update, exit non-zero; the newest
    # checkpoint is the last good state) or skip_step (no update, logged with "skipped": true)
    on_nonfinite: str = "stop"
    # the cosine schedule's length in steps; unset: train.steps of the run that started the folder
    # (its checkpoints keep it), so --steps on a resume moves where the run stops, not the schedule
    lr_decay_steps: int | None = None
    # bitwise-equal reruns of one config on one machine: attention plans deterministic=True (fixed
    # reduction orders, no atomics) and torch's deterministic algorithms for the rest of the model
    deterministic: bool = False


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainSection = field(default_factory=TrainSection)

    @property
    def world_size(self) -> int:
        return self.parallel.dp * self.parallel.cp

    @property
    def wrapper(self) -> str:
        """How the trainer wraps the model: ``"fsdp"`` (FSDP2; with ``cpu_offload`` even on one
        rank), ``"ddp"``, or ``"single"`` (one rank, no wrapper)."""
        if self.parallel.cpu_offload:
            return "fsdp"
        return "single" if self.world_size == 1 else self.parallel.dp_mode

    def plan_context(self, peak_tflops: float | None = None) -> PlanContext:
        """The job as the planners see it: each scheduler derives its options from it
        (:class:`~distattn.schedulers.PlanContext`); ``peak_tflops``: the GPU's (None: an H100's)."""
        m, p = self.model, self.parallel
        return PlanContext(m.n_heads, m.n_kv_heads, head_groups=p.head_groups, head_dim=m.dim // m.n_heads,
                           dtype_bytes=2 if self.train.dtype == "bf16" else 4, ulysses_degree=p.ulysses_degree,
                           peak_tflops=peak_tflops)

    def replace(self, **sections) -> "RunConfig":
        """Copy with fields of sections changed: ``cfg.replace(train={"steps": 5})``."""
        return dataclasses.replace(self, **{name: dataclasses.replace(getattr(self, name), **values)
                                            for name, values in sections.items()})


def _type_error(key: str, want: str, val) -> ValueError:
    return ValueError(f"{key} must be {want}, got {val!r} ({type(val).__name__}){_number_hint(val)}")


def _check_type(key: str, hint, val):
    """``val`` checked against a field's annotation (YAML gives ints where floats are meant:
    those are converted; strings, and bools for numbers, are refused)."""
    allowed = set(getattr(hint, "__args__", ())) or {hint}
    if val is None:
        if type(None) in allowed:
            return None
        raise _type_error(key, "set", val)
    if bool in allowed:
        if not isinstance(val, bool):
            raise _type_error(key, "true or false", val)
        return val
    if int in allowed:
        if isinstance(val, bool) or not isinstance(val, int):
            raise _type_error(key, "an int", val)
        return val
    if float in allowed:
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
            raise _type_error(key, "a finite number", val)
        return float(val)
    if not isinstance(val, str):
        raise _type_error(key, "a string", val)
    return val


def _number_hint(val) -> str:
    if not isinstance(val, str):
        return ""
    try:
        float(val)
    except (TypeError, ValueError):
        return ""
    return "; YAML reads numbers like 1e11 as text: write 1.0e+11 or the digits"


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


def _checked_types(cfg: RunConfig) -> RunConfig:
    sections = {}
    for name in ("model", "data", "parallel", "train"):
        section = getattr(cfg, name)
        hints = typing.get_type_hints(type(section))
        sections[name] = {f.name: _check_type(f"{name}.{f.name}", hints[f.name], getattr(section, f.name))
                          for f in dataclasses.fields(section)}
    return cfg.replace(**sections)


def _checked_blend(blend) -> tuple[BlendSource, ...] | None:
    """``data.blend`` as BlendSources, each value's type checked (``ValueError`` naming
    ``data.blend[i].key``)."""
    if blend is None:
        return None
    example = "e.g. [{path: data/a, weight: 0.3, source: megatron}, {path: data/b, weight: 0.7, source: tokens}]"
    if not isinstance(blend, (list, tuple)) or not blend:
        raise ValueError(f"data.blend must be a list of sources, each {{path, weight, source}}, {example}; got "
                         f"{blend!r:.80}")
    hints = typing.get_type_hints(BlendSource)
    known = [f.name for f in dataclasses.fields(BlendSource)]
    out = []
    for i, entry in enumerate(blend):
        key = f"data.blend[{i}]"
        if isinstance(entry, BlendSource):
            entry = dataclasses.asdict(entry)
        if not isinstance(entry, dict):
            raise ValueError(f"{key} must be a mapping {{path, weight, source}}, {example}; got {entry!r:.80}")
        for name in entry:
            if name not in known:
                raise ValueError(f"unknown config key '{key}.{name}'; known keys: {known}")
        if "weight" not in entry:
            raise ValueError(f"{key}.weight is required: the source's share of the tokens (weights are normalised)")
        out.append(BlendSource(**{name: _check_type(f"{key}.{name}", hints[name], entry[name])
                                  for name in known if name in entry}))
    return tuple(out)


def _check_sources(d: DataConfig, vocab_size: int) -> None:
    """``data.source`` and what it needs: a path, a tokenizer only for hf, a blend only for blend,
    positive weights, and a vocabulary that holds stdlib's bytes."""
    if d.source not in SOURCES:
        raise ValueError(f"data.source must be one of {', '.join(SOURCES)}, got {d.source!r}")
    if d.source == "blend":
        if not d.blend:
            raise ValueError("data.blend is required with data.source: blend (a list of {path, weight, source}, e.g. "
                             "[{path: data/a, weight: 0.3, source: megatron}, {path: data/b, weight: 0.7, source: "
                             "tokens}])")
        for key in ("path", "tokenizer"):
            if getattr(d, key) is not None:
                raise ValueError(f"data.{key} is not read with data.source: blend; give each source's {key} in "
                                 f"data.blend")
        entries = [(f"data.blend[{i}].", e) for i, e in enumerate(d.blend)]
    else:
        if d.blend is not None:
            raise ValueError(f"data.blend is read only with data.source: blend (got data.source: {d.source}); set "
                             f"data.source: blend, or remove data.blend")
        entries = [("data.", BlendSource(d.path, 1.0, d.source, d.tokenizer))]
    for key, e in entries:
        where = "data.source" if key == "data." else f"{key}source"
        if e.source not in SOURCES[:-1]:
            raise ValueError(f"{where} must be one of {', '.join(SOURCES[:-1])}, got {e.source!r}")
        if e.weight <= 0:
            raise ValueError(f"{key}weight must be > 0 (the source's share of the tokens), got {e.weight!r}")
        if e.source == "stdlib":
            from .data import BYTE_VOCAB

            if vocab_size < BYTE_VOCAB:
                raise ValueError(f"model.vocab_size {vocab_size} is smaller than the {BYTE_VOCAB} byte values "
                                 f"data.source: stdlib feeds; set model.vocab_size >= {BYTE_VOCAB}")
        elif not e.path:
            raise ValueError(f"{key}path is required with {where}: {e.source} ({_PATHS[e.source]})")
        if e.tokenizer is not None and e.source != "hf":
            raise ValueError(f"{key}tokenizer is read only with {where}: hf (it tokenizes a 'text' column); remove it")


def validate(cfg: RunConfig) -> RunConfig:
    """Types, ranges and combinations of every value; returns ``cfg`` with ints made floats where
    floats are meant. ``ValueError`` names the key and the fix."""
    blend = _checked_blend(cfg.data.blend)   # a list of mappings, which _checked_types does not take
    cfg = _checked_types(cfg.replace(data={"blend": None})).replace(data={"blend": blend})
    m, d, p, t = cfg.model, cfg.data, cfg.parallel, cfg.train
    positive = {"model.dim": m.dim, "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
                "model.n_kv_heads": m.n_kv_heads, "model.ffn_dim": m.ffn_dim, "model.vocab_size": m.vocab_size,
                "data.seq_len": d.seq_len, "parallel.dp": p.dp, "parallel.cp": p.cp, "train.steps": t.steps,
                "train.log_every": t.log_every, "train.ckpt_every": t.ckpt_every, "model.rope_theta": m.rope_theta,
                "parallel.timeout_s": p.timeout_s, "train.lr": t.lr, "train.loss_chunk": t.loss_chunk, "train.min_lr": t.min_lr, "train.grad_clip": t.grad_clip}
    for key, val in positive.items():
        if val <= 0:
            raise ValueError(f"{key} must be > 0, got {val!r}")
    for key, val in {"data.seed": d.seed, "train.seed": t.seed, "train.warmup_steps": t.warmup_steps,
                     "train.weight_decay": t.weight_decay, "train.mlp_chunk": t.mlp_chunk}.items():
        if val < 0:
            raise ValueError(f"{key} must be >= 0, got {val!r}")
    for key, val in {"data.seed": d.seed, "train.seed": t.seed}.items():
        if val >= 2**32:   # torch's and numpy's generators take it plus a rank or step offset
            raise ValueError(f"{key} must be below 2**32, got {val!r}")
    for key, most, why in CEILINGS:
        section, name = key.split(".")
        val = getattr(getattr(cfg, section), name)
        if val is not None and val > most:
            raise ValueError(f"{key} must be at most {most:g} ({why}), got {val!r}")
    if t.lr_decay_steps is not None and t.lr_decay_steps <= 0:
        raise ValueError(f"train.lr_decay_steps must be > 0 (the cosine schedule's length in steps), got "
                         f"{t.lr_decay_steps!r}; leave it unset for train.steps of the run that starts the folder")
    # Not per rank: ranks may hold no token (every scheduler trains so). But the loss needs a token whose
    # next one is in the same sequence and document: 2 tokens can be the last of one document and the
    # first of the next, while 3 always hold one where documents have 2 or more (stdlib's: 14 or more).
    if d.seq_len < 3:
        raise ValueError(f"data.seq_len must be at least 3, got {d.seq_len}: a shorter sequence can hold no token "
                         f"whose next one is in the same document, and its loss would be nan")
    if not t.out.strip():
        raise ValueError("train.out must name a folder for the run (metrics, checkpoints), got an empty string")
    if m.dim % m.n_heads or m.n_heads % m.n_kv_heads or (m.dim // m.n_heads) % 2:
        raise ValueError(f"model.dim ({m.dim}) must split into n_heads ({m.n_heads}) heads of even size, and "
                         f"n_heads must be a multiple of n_kv_heads ({m.n_kv_heads})")
    _check_sources(d, m.vocab_size)
    if m.softcap is not None and m.softcap <= 0:
        raise ValueError(f"model.softcap must be > 0 (Gemma 2 uses 50.0), got {m.softcap!r}; leave it unset for none")
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise ValueError(f"train.peak_tflops must be > 0, got {t.peak_tflops!r}; leave it unset to look it up")
    if p.comm_dtype not in (None, "fp8"):
        raise ValueError(f"parallel.comm_dtype must be fp8 or unset (tensors travel in their dtype), got "
                         f"{p.comm_dtype!r}")
    for key, val, choices in (("train.dtype", t.dtype, DTYPES),
                              ("train.activation_checkpointing", t.activation_checkpointing, CHECKPOINTING),
                              ("train.on_nonfinite", t.on_nonfinite, ON_NONFINITE)):
        if val not in choices:
            raise ValueError(f"{key} must be one of {', '.join(choices)}, got {val!r}")
    if p.backend != "auto":
        from ..kernels import available_backends   # registers the kernels; imports torch, needs no GPU

        if p.backend not in available_backends():
            raise ValueError(f"parallel.backend {p.backend!r} is unknown; choose auto (triton on CUDA, torch on "
                             f"CPU) or one of {', '.join(available_backends())}")
    if p.dp_mode not in ("ddp", "fsdp"):
        raise ValueError(f"parallel.dp_mode must be 'ddp' or 'fsdp', got {p.dp_mode!r}")
    if p.cpu_offload and p.dp_mode != "fsdp":
        raise ValueError("parallel.cpu_offload keeps FSDP2's parameter, gradient and optimizer shards in host "
                         f"memory: it needs parallel.dp_mode: fsdp (got {p.dp_mode!r})")
    from ..schedulers import LOCAL, NAMES, spec

    choices = (*NAMES, LOCAL.name)
    if p.scheduler not in choices:
        raise ValueError(f"parallel.scheduler {p.scheduler!r} is unknown; choose one of {', '.join(choices)}")
    if p.ulysses_degree is not None and (p.ulysses_degree < 1 or p.cp % p.ulysses_degree
                                         or p.ulysses_degree > m.n_heads):
        raise ValueError(f"parallel.ulysses_degree ({p.ulysses_degree}) must divide parallel.cp ({p.cp}) and be at "
                         f"most model.n_heads ({m.n_heads}); leave it unset for the default")
    if p.nano_batches not in (None, 1, 2):
        raise ValueError(f"parallel.nano_batches must be 1 or 2 (nano-batches per micro-batch, ping-ponged through "
                         f"the blocks), got {p.nano_batches!r}; leave it unset for the scheduler's default")
    if isinstance(p.head_groups, bool) or not isinstance(p.head_groups, int) or p.head_groups < 1:
        raise ValueError(f"parallel.head_groups must be a positive int, got {p.head_groups!r}")
    split = spec(p.scheduler).head_split(p.cp, cfg.plan_context()) if p.scheduler in NAMES else 1
    if split > 1:
        fewest = m.n_heads // split
        if p.head_groups > fewest:
            raise ValueError(f"parallel.head_groups ({p.head_groups}) must be at most the query heads a Ulysses rank "
                             f"computes ({fewest} of model.n_heads {m.n_heads}): use head_groups <= {fewest}")
    if t.compile:
        from ..ops import AVAILABLE

        if not AVAILABLE:
            import torch

            raise ValueError(f"train.compile needs a torch whose custom ops take opaque objects (distattn's plan "
                             f"is one; torch._opaque_base), and torch {torch.__version__} has none: upgrade torch "
                             f"or set train.compile: false")
    if not t.min_lr <= t.lr:
        raise ValueError(f"train.min_lr ({t.min_lr}) must be at most train.lr ({t.lr})")
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing a key written twice in one mapping (YAML keeps the last one
    silently, so a second ``lr:`` further down would win unnoticed). Keys merged in with ``<<:``
    may still be overridden: that is what a merge is for."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:   # an unhashable key: the base class says so
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (first on line {first.line + 1}); keep one",
                        key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path, overrides: typing.Iterable[str] | typing.Mapping[str, dict] = ()) -> RunConfig:
    """Read and validate a YAML run config -- a file, or the name of one shipped with distattn (``tiny``:
    :mod:`distattn.configs`); ``ValueError`` (one line) for a missing file, bad YAML or values.
    ``overrides``: ``section.key=value`` words, or :func:`.overrides.parse_overrides`' mapping; merged into
    the file's sections before any value is checked, so both are checked alike."""
    from .overrides import merge_overrides, parse_overrides   # here: overrides.py imports this module

    if not isinstance(overrides, typing.Mapping):
        overrides = parse_overrides(overrides)
    path = Path(path)
    if not path.exists() and path.suffix == "" and len(path.parts) == 1:   # a built-in config's name
        from .. import configs

        path = configs.path(path.name) or path
    try:
        text = path.read_text()
    except FileNotFoundError:
        from .. import configs

        raise ValueError(f"config {path} does not exist; pass a YAML file or a built-in config: "
                         f"{', '.join(configs.names())}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"config {path} cannot be read: {exc}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
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
    for key in raw:
        if key not in sections:
            raise ValueError(f"config {path}: unknown config section '{key}'; known: {sorted(sections)}")
    raw = merge_overrides(raw, overrides)
    return validate(RunConfig(**{name: _section(cls, raw.get(name), name) for name, cls in sections.items()}))
