"""Checking a run config (:mod:`.sections`): every value's type, range and combination with the
others, section by section; ``ValueError`` names the key and the fix."""

from __future__ import annotations

import dataclasses
import math
import reprlib
import typing

from ...schedulers import NAMES, spec
from .sections import AUTO, CAD_BACKWARDS, DP_MODES, SCHEDULERS, CHECKPOINTING, DTYPES, ON_BAD_DOCUMENT, ON_NONFINITE, PACKINGS, SOURCES, BlendSource, DataConfig, ModelConfig, ParallelConfig, RunConfig, TrainSection

# upper bounds of floats, past which a value is a typo rather than a setting: (key, most, why)
CEILINGS = (("parallel.timeout_s", 7 * 86400.0, "a week; a collective that waits longer has failed"),
            ("train.lr", 1.0, "AdamW moves each parameter by about lr per step"),
            ("train.weight_decay", 1.0, "AdamW shrinks each parameter by lr * weight_decay per step"),
            ("model.softcap", 1e4, "more than any attention score: no cap; leave it unset for none"),
            ("train.peak_tflops", 1e5, "100 PFLOP/s, far above any device's dense bf16 peak"))

# Upper bounds of ints, (keys, most, why): past them a value is a typo, and the planners, the memory model
# and the data stream form products of them in numpy's and torch's int64 (a rank's tokens x dim x bytes,
# dim x vocab, steps x tokens a step), which overflow into an OverflowError or a wrong index far from the
# key. Each bound is generous (100x any real run) yet leaves the products room; the products that several
# keys at their bounds could still overflow are bounded too (_ACTIVATIONS, _PARAMETERS, _TOKENS).
_STEPS = ("train.steps", "train.warmup_steps", "train.log_every", "train.ckpt_every", "train.lr_decay_steps",
          "train.keep_last")
INT_CEILINGS = (
    (("model.dim", "model.ffn_dim", "model.n_heads", "model.n_kv_heads", "parallel.head_groups"), 2**24,
     "16M: 100x the widest model"),
    (("model.n_layers",), 2**16, "65536 blocks: 100x the deepest model"),
    (("model.vocab_size",), 2**31, "2**31: token ids are int32 in kernels and tokenizers"),
    (("data.seq_len", "data.token_cap", "train.loss_chunk", "train.mlp_chunk"), 2**31,
     "2**31 tokens: attention kernels index a sequence's tokens in int32"),
    (("parallel.dp", "parallel.cp", "parallel.world_size", "parallel.dp_shard", "parallel.ulysses_degree"), 2**20,
     "a million ranks: 10x the largest cluster"),
    (_STEPS, 2**40, "a trillion steps"))
# products of keys that each pass INT_CEILINGS but together would overflow int64: (what, most, why)
_ACTIVATIONS = 2**50   # elements: 2 PiB of bf16, 10000x a node's memory
_PARAMETERS = 2**48    # 281T: 100x the largest model
_TOKENS = 2**62        # int64's range, halved for the sums over ranks


_PATHS = {"tokens": "a directory from `distattn data prepare`, or the prefix of PATH.bin and PATH.idx.npy",
          "megatron": "the PREFIX of Megatron's PREFIX.bin and PREFIX.idx, as its --data-path",
          "hf": "a folder written by Dataset.save_to_disk, a .parquet file or a folder of them"}


def validate(cfg: RunConfig) -> RunConfig:
    """Types, ranges and combinations of every value; returns ``cfg`` with ints made floats where
    floats are meant. ``ValueError`` names the key and the fix."""
    blend = _checked_blend(cfg.data.blend)   # a list of mappings, which _checked_types does not take
    cfg = _checked_types(cfg.replace(data={"blend": None})).replace(data={"blend": blend})
    _check_ranges(cfg)
    _check_bounds(cfg)
    _check_model(cfg.model)
    _check_data(cfg.data, cfg.model.vocab_size)
    _check_parallel(cfg.parallel, cfg.model)
    _check_auto(cfg)
    _check_train(cfg.train)
    _check_head_groups(cfg)
    _check_dp_shard(cfg)
    return cfg


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60


def _r(val) -> str:
    """``repr(val)`` cut to 80 characters, at a bounded cost: a YAML anchor bomb under a typed key expands to
    a value too large to print whole (its full repr ran out of memory after a minute)."""
    text = _REPR.repr(val)
    return text if len(text) <= 80 else f"{text[:72]}...{text[-5:]}"


def _type_error(key: str, want: str, val) -> ValueError:
    return ValueError(f"{key} must be {want}, got {_r(val)} ({type(val).__name__}){_number_hint(val)}")


def _check_type(key: str, hint, val):
    """``val`` checked against a field's annotation (YAML gives ints where floats are meant:
    those are converted; strings, and bools for numbers, are refused)."""
    allowed = set(getattr(hint, "__args__", ())) or {hint}
    pair = next((a for a in allowed if typing.get_origin(a) is tuple), None)
    if pair is not None and val is not None:
        items = typing.get_args(pair)
        want = f"a list [{', '.join(t.__name__ for t in items)}]"
        if not isinstance(val, (list, tuple)) or len(val) != len(items):
            raise _type_error(key, want, val)
        return tuple(_check_type(f"{key}[{i}]", t, x) for i, (t, x) in enumerate(zip(items, val)))
    if val is None:
        if type(None) in allowed:
            return None
        raise _type_error(key, "set", val)
    if bool in allowed:
        if not isinstance(val, bool):
            raise _type_error(key, "true or false", val)
        return val
    if int in allowed and not (str in allowed and isinstance(val, str)):   # (parallel.cp: auto)
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
                         f"{_r(blend)}")
    hints = typing.get_type_hints(BlendSource)
    known = [f.name for f in dataclasses.fields(BlendSource)]
    out = []
    for i, entry in enumerate(blend):
        key = f"data.blend[{i}]"
        if isinstance(entry, BlendSource):
            entry = dataclasses.asdict(entry)
        if not isinstance(entry, dict):
            raise ValueError(f"{key} must be a mapping {{path, weight, source}}, {example}; got {_r(entry)}")
        for name in entry:
            if name not in known:
                raise ValueError(f"unknown config key '{key}.{name}'; known keys: {known}")
        if "weight" not in entry:
            raise ValueError(f"{key}.weight is required: the source's share of the tokens (weights are normalised)")
        out.append(BlendSource(**{name: _check_type(f"{key}.{name}", hints[name], entry[name])
                                  for name in known if name in entry}))
    return tuple(out)


def _check_ranges(cfg: RunConfig) -> None:
    """The numbers of every section: positive, non-negative, seeds, and below :data:`CEILINGS`."""
    m, d, p, t = cfg.model, cfg.data, cfg.parallel, cfg.train
    if isinstance(p.cp, str) and p.cp != AUTO:
        raise ValueError(f"parallel.cp must be a positive int or auto (chosen per step), got {_r(p.cp)}")
    positive = {"model.dim": m.dim, "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
                "model.n_kv_heads": m.n_kv_heads, "model.ffn_dim": m.ffn_dim, "model.vocab_size": m.vocab_size,
                "data.seq_len": d.seq_len, "parallel.dp": p.dp, "parallel.cp": 1 if p.cp == AUTO else p.cp,
                "parallel.world_size": 1 if p.world_size is None else p.world_size, "train.steps": t.steps,
                "train.log_every": t.log_every, "train.ckpt_every": t.ckpt_every, "model.rope_theta": m.rope_theta,
                "parallel.timeout_s": p.timeout_s, "train.lr": t.lr, "train.loss_chunk": t.loss_chunk,
                "train.min_lr": t.min_lr, "train.grad_clip": t.grad_clip}
    for key, val in positive.items():
        if val <= 0:
            raise ValueError(f"{key} must be > 0, got {_r(val)}")
    for key, val in {"data.seed": d.seed, "train.seed": t.seed, "train.warmup_steps": t.warmup_steps,
                     "train.weight_decay": t.weight_decay, "train.mlp_chunk": t.mlp_chunk}.items():
        if val < 0:
            raise ValueError(f"{key} must be >= 0, got {_r(val)}")
    for key, val in {"data.seed": d.seed, "train.seed": t.seed}.items():
        if val >= 2**32:   # torch's and numpy's generators take it plus a rank or step offset
            raise ValueError(f"{key} must be below 2**32, got {_r(val)}")
    for key, most, why in CEILINGS:
        section, name = key.split(".")
        val = getattr(getattr(cfg, section), name)
        if val is not None and val > most:
            raise ValueError(f"{key} must be at most {most:g} ({why}), got {_r(val)}")


def _check_bounds(cfg: RunConfig) -> None:
    """Every int key below its :data:`INT_CEILINGS` bound, and the products the code forms of them in int64
    below theirs (so a typo like 10**100 is refused here, not as an OverflowError in a planner)."""
    for keys, most, why in INT_CEILINGS:
        for key in keys:
            section, name = key.split(".")
            val = getattr(getattr(cfg, section), name)
            if isinstance(val, int) and val > most:
                raise ValueError(f"{key} must be at most {most:,} ({why}), got {_r(val)}")
    m, t = cfg.model, cfg.train
    if t.profile_steps is not None and any(x > 2**40 for x in t.profile_steps):
        raise ValueError(f"train.profile_steps must be steps at most {2**40:,} (a trillion steps), got "
                         f"{_r(list(t.profile_steps))}")
    tokens = cfg.rank_tokens
    for what, val, most, why in (
            ("data.seq_len (or data.token_cap) x model.dim x model.n_layers", tokens * m.dim * m.n_layers,
             _ACTIVATIONS, "a sequence's activations: 2 PiB in bf16"),
            ("the parameters (model.dim, ffn_dim, n_layers, vocab_size)", m.shape.params, _PARAMETERS,
             "100x the largest model"),
            ("train.steps x the tokens a step trains (data.seq_len x parallel.dp x cp)",
             t.steps * cfg.world_size * tokens, _TOKENS, "the run's token count must fit int64")):
        if val > most:
            raise ValueError(f"{what} is {val:.3g}, more than {most:.3g} ({why}): one of them is a typo")


def _check_model(m: ModelConfig) -> None:
    """Heads that split ``model.dim`` evenly, GQA groups, the soft-cap."""
    if m.dim % m.n_heads or m.n_heads % m.n_kv_heads or (m.dim // m.n_heads) % 2:
        raise ValueError(f"model.dim ({m.dim}) must split into n_heads ({m.n_heads}) heads of even size, and "
                         f"n_heads must be a multiple of n_kv_heads ({m.n_kv_heads})")
    if m.softcap is not None and m.softcap <= 0:
        raise ValueError(f"model.softcap must be > 0 (Gemma 2 uses 50.0), got {_r(m.softcap)}; leave it unset for none")


def _check_data(d: DataConfig, vocab_size: int) -> None:
    """``data.seq_len``, and ``data.source`` and what it needs: a path, a tokenizer only for hf, a
    blend only for blend, positive weights, and a vocabulary that holds stdlib's bytes."""
    # Not per rank: ranks may hold no token (every scheduler trains so). But the loss needs a token whose
    # next one is in the same sequence and document: 2 tokens can be the last of one document and the
    # first of the next, while 3 always hold one where documents have 2 or more (stdlib's: 14 or more).
    if d.seq_len < 3:
        raise ValueError(f"data.seq_len must be at least 3, got {d.seq_len}: a shorter sequence can hold no token "
                         f"whose next one is in the same document, and its loss would be nan")
    if d.source not in SOURCES:
        raise ValueError(f"data.source must be one of {', '.join(SOURCES)}, got {_r(d.source)}")
    if d.packing is not None and d.packing not in PACKINGS:
        raise ValueError(f"data.packing must be one of {', '.join(PACKINGS)}, got {_r(d.packing)}; leave it unset "
                         f"for balanced where parallel.dp > 1, else stream")
    if d.on_bad_document not in ON_BAD_DOCUMENT:
        raise ValueError(f"data.on_bad_document must be one of {', '.join(ON_BAD_DOCUMENT)}, got "
                         f"{_r(d.on_bad_document)}")
    if d.token_cap is not None and d.token_cap < d.seq_len:
        raise ValueError(f"data.token_cap ({d.token_cap}) must be at least data.seq_len ({d.seq_len}): a piece of "
                         f"the stream can be seq_len tokens long; raise it or leave it unset for ceil(1.25 * seq_len)")
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
            raise ValueError(f"{where} must be one of {', '.join(SOURCES[:-1])}, got {_r(e.source)}")
        if e.weight <= 0:
            raise ValueError(f"{key}weight must be > 0 (the source's share of the tokens), got {_r(e.weight)}")
        if e.source == "stdlib":
            from ..data.corpus import BYTE_VOCAB

            if vocab_size < BYTE_VOCAB:
                raise ValueError(f"model.vocab_size {vocab_size} is smaller than the {BYTE_VOCAB} byte values "
                                 f"data.source: stdlib feeds; set model.vocab_size >= {BYTE_VOCAB}")
        elif not e.path:
            raise ValueError(f"{key}path is required with {where}: {e.source} ({_PATHS[e.source]})")
        if e.tokenizer is not None and e.source != "hf":
            raise ValueError(f"{key}tokenizer is read only with {where}: hf (it tokenizes a 'text' column); remove it")




def _check_parallel(p: ParallelConfig, m: ModelConfig) -> None:
    """The wire dtype, kernel backend, data-parallel wrapper, and the scheduler and its options
    against the model's heads."""
    if p.comm_dtype not in (None, "fp8"):
        raise ValueError(f"parallel.comm_dtype must be fp8 or unset (tensors travel in their dtype), got "
                         f"{_r(p.comm_dtype)}")
    if p.backend != "auto":
        from ...kernels import available_backends

        if p.backend not in available_backends():
            raise ValueError(f"parallel.backend {_r(p.backend)} is unknown; choose auto (triton on CUDA, torch on "
                             f"CPU) or one of {', '.join(available_backends())}")
    if p.cad_backward not in (*CAD_BACKWARDS, AUTO):
        raise ValueError(f"parallel.cad_backward must be resend, keep or auto (what cad's attention servers keep for "
                         f"the backward), got {_r(p.cad_backward)}")
    if p.dp_mode not in DP_MODES:
        raise ValueError(f"parallel.dp_mode must be one of {', '.join(DP_MODES)}, got {_r(p.dp_mode)}")
    if p.dp_shard is not None and p.dp_mode != "hsdp":
        raise ValueError(f"parallel.dp_shard is the ranks sharding each parameter under dp_mode: hsdp; unset it for "
                         f"dp_mode: {p.dp_mode}")
    if p.cpu_offload and p.dp_mode != "fsdp":
        raise ValueError("parallel.cpu_offload keeps FSDP2's parameter, gradient and optimizer shards in host "
                         f"memory: it needs parallel.dp_mode: fsdp (got {_r(p.dp_mode)})")
    if p.scheduler not in SCHEDULERS:
        raise ValueError(f"parallel.scheduler {_r(p.scheduler)} is unknown; choose one of {', '.join(SCHEDULERS)}")
    if p.ulysses_degree is not None and (p.ulysses_degree < 1 or p.fixed_cp % p.ulysses_degree
                                         or p.ulysses_degree > m.n_heads):
        raise ValueError(f"parallel.ulysses_degree ({p.ulysses_degree}) must divide parallel.cp ({p.fixed_cp}) and "
                         f"be at most model.n_heads ({m.n_heads}); leave it unset for the default")
    spec(p.fixed_scheduler).nano_batches_for(p.nano_batches, key="parallel.nano_batches")
    if isinstance(p.head_groups, bool) or not isinstance(p.head_groups, int) or p.head_groups < 1:
        raise ValueError(f"parallel.head_groups must be a positive int, got {_r(p.head_groups)}")


def _check_dp_shard(cfg: RunConfig) -> None:
    """``parallel.dp_shard`` groups the world's ranks: it must divide them."""
    shard, world = cfg.parallel.dp_shard, cfg.world_size
    if shard is not None and (shard < 1 or world % shard):
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(f"parallel.dp_shard ({_r(shard)}) must divide the dp x cp = {world} ranks into equal shard "
                         f"groups: choose one of {divisors}, or unset it for the ranks of one node")


def _check_head_groups(cfg: RunConfig) -> None:
    """The query heads a Ulysses rank computes (at least one), and ``parallel.head_groups`` against them,
    under the job's own plan context (so last: every value it reads is checked)."""
    p, m = cfg.parallel, cfg.model
    entry = spec(p.fixed_scheduler) if p.fixed_scheduler in NAMES else None
    if entry is not None and "head_groups" in entry.option_names() and p.fixed_cp > 1:
        split = entry.head_split(p.fixed_cp, cfg.plan_context())
        # first: with fewer heads than ranks the head_groups bound below would be 0, blaming a key the
        # user never set (ulysses splits the heads over every rank, usp over its degree, which
        # _check_parallel already holds to model.n_heads where it is set)
        if split > m.n_heads:
            cp, usp = ("parallel.cp", f"usp with parallel.ulysses_degree <= {m.n_heads}") if p.cp != AUTO else \
                ("parallel.world_size / parallel.dp", "usp or auto (which choose usp's degree per step)")
            raise ValueError(f"{m.n_heads} query heads (model.n_heads) < {cp} {split}: Ulysses needs at least one "
                             f"head per rank; use parallel.scheduler: {usp}, or {cp} <= {m.n_heads}")
        fewest = m.n_heads // split
        if p.head_groups > fewest:
            raise ValueError(f"parallel.head_groups ({p.head_groups}) must be at most the query heads a Ulysses rank "
                             f"computes ({fewest} of model.n_heads {m.n_heads}): use head_groups <= {fewest}")


def _check_auto(cfg: RunConfig) -> None:
    """``parallel.cp: auto`` / ``parallel.scheduler: auto``: the world they choose groups from, the
    schedulers that can share a step, and the keys a choice decides itself."""
    p, d = cfg.parallel, cfg.data
    if p.cp == AUTO:
        if p.world_size is None or p.world_size < 1 or p.world_size % p.dp:
            raise ValueError(f"parallel.cp: auto needs parallel.world_size, the job's ranks, a multiple of parallel.dp "
                             f"({p.dp}: the sequences of data.seq_len each step trains), got {_r(p.world_size)}")
    elif p.world_size is not None and p.world_size != p.dp * p.cp:
        raise ValueError(f"parallel.world_size ({p.world_size}) is read with parallel.cp: auto; with cp {p.cp} the job "
                         f"has dp * cp = {p.dp * p.cp} ranks: remove it")
    if not p.auto:
        if p.network is not None:
            raise ValueError("parallel.network prices parallel.scheduler/cp: auto's choices; remove it, or set one "
                             "of them to auto")
        return
    from ...costmodel.network import profile_of
    from ...sim.per_batch import PER_MICRO_BATCH

    if p.network is not None:   # read here, before any rank starts (and for --print-config)
        try:
            profile_of(p.network)
        except ValueError as exc:
            raise ValueError(f"parallel.network: {exc}") from None

    if p.scheduler != AUTO and p.scheduler not in PER_MICRO_BATCH:
        raise ValueError(f"parallel.cp: auto runs CP groups of several sizes in one step, which {p.scheduler} (one "
                         f"plan pooled over every replica, two nano-batches) cannot share: choose one of "
                         f"{', '.join(PER_MICRO_BATCH)}, or auto (whose groups may run {p.scheduler} over their own "
                         f"ranks), or fix parallel.cp")
    for key, val in (("parallel.ulysses_degree", p.ulysses_degree), ("data.packing", d.packing),
                     ("parallel.nano_batches", p.nano_batches if p.nano_batches != 1 else None)):
        if val is not None:
            raise ValueError(f"{key} is chosen per step with parallel.scheduler/cp: auto (usp's degree, the groups' "
                             f"documents, their nano-batches): remove it")


def _check_train(t: TrainSection) -> None:
    """The schedule's length, the run folder, the device peak, the words a key takes, torch.compile
    and the learning rates' order."""
    if t.lr_decay_steps is not None and t.lr_decay_steps <= 0:
        raise ValueError(f"train.lr_decay_steps must be > 0 (the cosine schedule's length in steps), got "
                         f"{_r(t.lr_decay_steps)}; leave it unset for train.steps of the run that starts the folder")
    if not t.out.strip():
        raise ValueError("train.out must name a folder for the run (metrics, checkpoints), got an empty string")
    if t.peak_tflops is not None and t.peak_tflops <= 0:
        raise ValueError(f"train.peak_tflops must be > 0, got {_r(t.peak_tflops)}; leave it unset to look it up")
    for key, val, choices in (("train.dtype", t.dtype, DTYPES),
                              ("train.activation_checkpointing", t.activation_checkpointing, CHECKPOINTING),
                              ("train.on_nonfinite", t.on_nonfinite, ON_NONFINITE)):
        if val not in choices:
            raise ValueError(f"{key} must be one of {', '.join(choices)}, got {_r(val)}")
    if t.compile:
        from ...runtime.ops import AVAILABLE

        if not AVAILABLE:
            import torch

            raise ValueError(f"train.compile needs a torch whose custom ops take opaque objects (distattn's plan "
                             f"is one; torch._custom_class_base, torch._opaque_base before 2.14), and torch "
                             f"{torch.__version__} has none: upgrade torch or set train.compile: false")
    if not t.min_lr <= t.lr:
        raise ValueError(f"train.min_lr ({t.min_lr}) must be at most train.lr ({t.lr})")
    if t.keep_last is not None and t.keep_last < 1:
        raise ValueError(f"train.keep_last must be >= 1 (the newest checkpoints kept), got {_r(t.keep_last)}; leave it "
                         f"unset to keep every checkpoint")
    # not capped by train.steps: a resumed run (--steps raised) profiles steps past the first run's end
    if t.profile_steps is not None and not 1 <= t.profile_steps[0] <= t.profile_steps[1]:
        raise ValueError(f"train.profile_steps must be [start, end] with 1 <= start <= end (the steps profiled, "
                         f"counted from 1), got {_r(list(t.profile_steps))}; leave it unset for none")
