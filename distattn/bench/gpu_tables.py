"""The GPU report's tables and goal verdicts, from what its runs measured (no GPU needed: plain data in,
Markdown lines out).

Goals (the issue's), each marked ``met`` / ``NOT met`` from the measured numbers, ``not measured``
where a number is missing:

* Triton's forward+backward at least 1.0x PyTorch's FlashAttention-2 (the ``torch`` backend) at head
  dims 64 and 128: the *smallest* ratio over every length and mask measured;
* Triton's backward at least 350 TFLOP/s at 32K tokens, causal, head dim 128;
* the memory estimate within 10% of ``torch.cuda.max_memory_allocated`` in every setting of the memory
  comparison (measured over the estimate minus its CUDA runtime, which the allocator does not see);
* the 8B-shaped stack at least 40% MFU at 32K tokens per step.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from ..sim.memory_model import GIB
from .gpu_runner import Outcome

TOLERANCE = 0.10            # the estimate's goal: measured within 10% of it
BWD_GOAL = 350.0            # TFLOP/s, triton backward, 32K causal hd 128
MFU_GOAL = 0.40             # the 8B-shaped stack at 32K
SPEEDUP_GOAL = 1.0          # triton f+b over torch f+b, hd 64 and 128


def summarize(rows: list[dict], warmup: int) -> dict:
    """Means of tokens/s and MFU over the steps after ``warmup`` (all steps when there are no more),
    the run's peak (the last row's ``peak_memory_gib``, the largest: the trainer's allocator peak is
    never reset), the first and last loss."""
    warm = rows[warmup:] or rows
    mfu = [r["mfu"] for r in warm if r.get("mfu") is not None]
    return {"tokens_per_s": statistics.mean(r["tokens_per_s"] for r in warm),
            "mfu": statistics.mean(mfu) if mfu else None,
            "peak_gib": max(r["peak_memory_gib"] for r in rows), "loss": (rows[0]["loss"], rows[-1]["loss"]),
            "steps": (warmup + 1 if rows[warmup:] else 1, len(rows))}


def ratio(measured_gib: float, total_bytes: int, runtime_bytes: int) -> float:
    """Measured allocator peak over the estimate's allocator share (its total minus the CUDA runtime)."""
    return measured_gib * GIB / (total_bytes - runtime_bytes)


def within(r: float | None) -> bool | None:
    return None if r is None else abs(r - 1) <= TOLERANCE


def _mark(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def memory_rows(outcomes: list[Outcome]) -> list[dict]:
    """Per run: the estimate (total, as ``--dry-run`` prints; minus the runtime), the measured peak and
    their ratio (None where the run failed)."""
    out = []
    for o in outcomes:
        est = o.run.estimate()
        peak = summarize(o.rows, 0)["peak_gib"] if o.ok else None
        r = None if peak is None else ratio(peak, est.total, est.runtime)
        out.append({"name": o.run.name, "seq_len": o.run.seq_len, "setting": o.run.setting.label, "total": est.total,
                    "allocated": est.total - est.runtime, "host": est.host + est.host_states, "measured_gib": peak,
                    "ratio": r, "within": within(r), "why": None if o.ok else o.why(), "seconds": o.seconds,
                    "together": o.together})
    return out


def memory_table(rows: list[dict]) -> list[str]:
    """Columns: setting; tokens per step; the estimate's total (what ``--dry-run`` prints, the CUDA
    runtime's 4 GiB included); the estimate less the runtime (what the allocator should see); the
    measured ``torch.cuda.max_memory_allocated`` peak of the run; measured / (estimate - runtime); the goal
    (within 10%); the estimate's host memory (offloaded activations, cpu_offload's states); runs sharing
    the GPU."""
    body = []
    for r in rows:
        if r["why"]:
            body.append([r["setting"], f"{r['seq_len']:,}", _gib(r["total"]), _gib(r["allocated"]), r["why"], "", "",
                         _gib(r["host"]), str(r["together"])])
            continue
        body.append([r["setting"], f"{r['seq_len']:,}", _gib(r["total"]), _gib(r["allocated"]),
                     f"{r['measured_gib']:.2f}", f"{r['ratio']:.3f}", _mark(r["within"]), _gib(r["host"]),
                     str(r["together"])])
    return _table(["setting", "tokens/step", "estimate GiB (--dry-run)", "estimate - runtime GiB",
                   "measured GiB (max_memory_allocated)", "measured / (estimate - runtime)", "goal: within 10%",
                   "host GiB (estimate)", "runs on the GPU"], body)


def stack_rows(outcomes: list[Outcome]) -> list[dict]:
    """Per run of the 8B-shaped stack: tokens/s, MFU, peak, and the estimate beside the peak."""
    out = []
    for o in outcomes:
        est, s = o.run.estimate(), summarize(o.rows, o.run.warmup) if o.ok else None
        r = None if s is None else ratio(s["peak_gib"], est.total, est.runtime)
        out.append({"seq_len": o.run.seq_len, "setting": o.run.setting.label, "summary": s, "total": est.total,
                    "allocated": est.total - est.runtime, "ratio": r, "why": None if s else o.why(),
                    "seconds": o.seconds})
    return out


def stack_table(rows: list[dict]) -> list[str]:
    """Columns: tokens per step; the setting the estimate chose (the cheapest that fits with 10% to
    spare); tokens/s and MFU (means over the steps after the warm-up); the goal at 32K (MFU >= 40%);
    the run's allocator peak; the estimate less the runtime and their ratio; the steps averaged; wall s."""
    body = []
    for r in rows:
        s = r["summary"]
        if s is None:
            body.append([f"{r['seq_len']:,}", r["setting"], r["why"], "", "", "", _gib(r["allocated"]), "", "",
                         f"{r['seconds']:.0f}"])
            continue
        goal = _mark(None if s["mfu"] is None else s["mfu"] >= MFU_GOAL) if r["seq_len"] == 32768 else "-"
        body.append([f"{r['seq_len']:,}", r["setting"], f"{s['tokens_per_s']:,.0f}", _num(s["mfu"], "{:.1%}"), goal,
                     f"{s['peak_gib']:.2f}", _gib(r["allocated"]), f"{r['ratio']:.3f}",
                     f"{s['steps'][0]}..{s['steps'][1]}", f"{r['seconds']:.0f}"])
    return _table(["tokens/step", "setting (by the estimate)", "tokens/s", "MFU", "goal: MFU >= 40% at 32K",
                   "peak GiB (max_memory_allocated)", "estimate - runtime GiB", "measured / (estimate - runtime)",
                   "steps averaged", "wall s"], body)


def backend_table(outcomes: list[Outcome]) -> list[str]:
    """Columns: the run; tokens/s and MFU (means after the warm-up steps); the allocator peak; the loss
    of the first and last step; wall seconds."""
    body = []
    for o in outcomes:
        if not o.ok:
            body.append([o.run.name, o.why(), "", "", "", f"{o.seconds:.0f}"])
            continue
        s = summarize(o.rows, o.run.warmup)
        body.append([o.run.name, f"{s['tokens_per_s']:,.0f}", _num(s["mfu"], "{:.1%}"), f"{s['peak_gib']:.1f}",
                     f"{s['loss'][0]:.3f} -> {s['loss'][1]:.3f}", f"{o.seconds:.0f}"])
    return _table(["run", "tokens/s", "MFU", "peak GiB", "loss (first -> last)", "wall s"], body)


def _cell(rows: dict, backend: str, column: str) -> float | None:
    row = rows.get(backend)
    return None if row is None else row.get(column)


def kernel_table(rows: list[dict], backends=("triton", "torch", "fa3")) -> list[str]:
    """One line per case (head dim, query/KV heads per call, tokens per sequence, mask): each backend's
    forward, backward and forward+backward TFLOP/s (``n/a``: unsupported, not installed or skipped), and
    triton's f+b over torch's and over FA3's. The head sweep's rows (``--heads``) come last."""
    cases: dict[tuple, dict] = {}
    for r in sorted((r for r in rows if not r.get("cad_shape")), key=lambda r: bool(r.get("heads_sweep"))):
        heads = f"{r['heads']}/{r['kv_heads']}" if "heads" in r else "-"
        cases.setdefault((r["head_dim"], heads, r["seq_len"], r["mask"]), {})[r["backend"]] = r
    body = []
    for (hd, heads, s, mask), by in cases.items():
        cells = [_num(_cell(by, b, c)) for b in backends for c in ("fwd", "bwd", "fwd_bwd")]
        tri = _cell(by, "triton", "fwd_bwd")
        vs = [_num(None if tri is None or _cell(by, b, "fwd_bwd") is None else tri / _cell(by, b, "fwd_bwd"), "{:.2f}x")
              for b in backends[1:]]
        body.append([hd, heads, f"{s // 1024}K", mask, *cells, *vs])
    header = ["head dim", "heads q/kv", "tokens/seq", "mask"] + \
        [f"{b} {c}" for b in backends for c in ("fwd", "bwd", "f+b")] + [f"triton/{b} f+b" for b in backends[1:]]
    notes = sorted({f"{r['backend']}: {r['note']}" for r in rows if r.get("note")})
    return _table(header, body) + ([""] + [f"- {n}" for n in notes] if notes else [])


def heads_table(rows: list[dict], backends=("triton", "torch", "fa3")) -> list[str]:
    """The head sweep (``--heads``; none: no lines): per length and query heads per call, each backend's
    forward and backward speed per FLOP over its speed on the most heads at that length (equal work per
    call) -- where the tile model (:mod:`distattn.costmodel.tiles`) puts a call's critical path, measured on
    this GPU."""
    sweep = [r for r in rows if r.get("heads_sweep")]
    if not sweep:
        return []
    most = {(r["seq_len"], r["backend"]): r for r in sorted(sweep, key=lambda r: r["heads"])}
    body = []
    for s in sorted({r["seq_len"] for r in sweep}):
        for h in sorted({r["heads"] for r in sweep if r["seq_len"] == s}):
            by = {r["backend"]: r for r in sweep if r["seq_len"] == s and r["heads"] == h}
            cells = []
            for b in backends:
                top = most.get((s, b), {})
                cells += [_num(None if not top.get(c) or _cell(by, b, c) is None else _cell(by, b, c) / top[c],
                               "{:.3f}") for c in ("fwd", "bwd")]
            kv = next(iter(by.values()))["kv_heads"]
            body.append([f"{s // 1024}K", f"{h}/{kv}", *cells])
    top = max(r["heads"] for r in sweep)
    return ["", f"Speed per FLOP on H query heads per call over {top} heads' at the same length (equal work per "
            f"call, causal, head dim {sweep[0]['head_dim']}; the simulator's head term):", "",
            *_table(["tokens/seq", "heads q/kv"] + [f"{b} {c}" for b in backends for c in ("fwd", "bwd")], body)]


def cad_table(rows: list[dict], backends=("triton", "torch", "fa3")) -> list[str]:
    """The CAD-shaped calls (``--cad-shapes``; none: no lines): per backend and shape, the forward's and
    the backward's milliseconds measured, as the shipped tile model prices them at this report's level
    of the backend (its 32K causal forward and backward), and as a tile model fitted to the backend's
    own causal rows prices them (:func:`distattn.costmodel.tiles.fit`) -- what ``distattn cluster kernel-fit`` of
    the report's kernel table answers."""
    from ..kernels.tools.bench import table_rows
    from ..costmodel.tiles import H100, KernelRow, fit, predict

    cad = [r for r in rows if r.get("cad_shape") and r.get("fwd_ms") and r.get("bwd_ms")]
    if not cad:
        return []
    body = []
    for b in backends:
        mine = [t for t in table_rows(rows) if t["backend"] == b]
        known = [KernelRow(t["k_len"], 1, 1, t["q_len"], t["k_len"], t["heads"], t["direction"], t["ms"] * 1e-3,
                           t["segments"], b) for t in mine]
        fitted = fit(known) if {k.direction for k in known} >= {"forward", "backward"} and len(known) >= 8 else None
        ref = next((r for r in rows if r["backend"] == b and r["mask"] == "causal" and r["seq_len"] == 32768
                    and not r.get("cad_shape") and not r.get("heads_sweep") and r.get("fwd")), None)
        shipped = None if ref is None else H100.at_level(ref["fwd"], ref["bwd"], int(ref["head_dim"]), "report",
                                                          heads=ref["heads"])
        for r in (r for r in cad if r["backend"] == b):
            cells = []
            for direction, key in (("forward", "fwd_ms"), ("backward", "bwd_ms")):
                one = [KernelRow(r["seq_len"], 1, 1, r["q_len"], r["seq_len"], r["heads"], direction, 1.0)]
                cells += [f"{r[key]:.3f}"] + [_num(None if m is None else float(predict(m, one)[0]) * 1e3, "{:.3f}")
                                             for m in (shipped, fitted)]
            body.append([b, f"{r['q_len']}:{r['seq_len']}", *cells, _num(r["bwd"])])
    return ["", "CAD-shaped calls (one causal segment of Q query rows against K keys, 32/8 heads): milliseconds "
            "measured, as the shipped tile model prices them at this backend's 32K level, and as a tile model "
            "fitted to this backend's causal rows prices them:", "",
            *_table(["backend", "Q:K", "fwd ms", "shipped", "fitted", "bwd ms", "shipped", "fitted", "bwd TFLOP/s"],
                    body)]


@dataclass(frozen=True)
class Goal:
    name: str
    target: str
    measured: str
    ok: bool | None

    @property
    def verdict(self) -> str:
        return _mark(self.ok)


def goals(kernel_rows: list[dict] | None, memory: list[dict] | None, stack: list[dict] | None) -> list[Goal]:
    """The four goals (module docstring) from the parts measured so far (None: not run yet)."""
    out = []
    kernel_rows = [r for r in kernel_rows or [] if not r.get("heads_sweep") and not r.get("cad_shape")]
    by = {(r["head_dim"], r["seq_len"], r["mask"], r["backend"]): r for r in kernel_rows}
    for hd in ("64", "128"):
        pairs = [((s, m), by[(h, s, m, "triton")]["fwd_bwd"] / t["fwd_bwd"])
                 for (h, s, m, b), t in by.items() if h == hd and b == "torch" and t["fwd_bwd"]
                 and by.get((h, s, m, "triton"), {}).get("fwd_bwd")]
        worst = min(pairs, key=lambda p: p[1]) if pairs else None
        out.append(Goal(f"triton f+b vs torch (FA2), hd {hd}", ">= 1.0x at every length and mask",
                        "not measured" if worst is None else
                        f"min {worst[1]:.2f}x ({worst[0][0] // 1024}K {worst[0][1]}) over {len(pairs)} cases",
                        None if worst is None else worst[1] >= SPEEDUP_GOAL))
    bwd = by.get(("128", 32768, "causal", "triton"), {}).get("bwd")
    out.append(Goal("triton backward, 32K causal hd 128", f">= {BWD_GOAL:.0f} TFLOP/s",
                    _num(bwd, "{:.1f} TFLOP/s"), None if bwd is None else bwd >= BWD_GOAL))
    measured = [r for r in memory or [] if r["ratio"] is not None]
    bad = [r for r in measured if not r["within"]]
    failed = len(memory or []) - len(measured)
    out.append(Goal("memory estimate vs max_memory_allocated", "within 10% in every setting",
                    "not measured" if not measured else
                    f"{len(measured) - len(bad)}/{len(measured)} within; ratios "
                    f"{min(r['ratio'] for r in measured):.3f}..{max(r['ratio'] for r in measured):.3f}"
                    + (f"; {failed} run(s) failed" if failed else ""),
                    False if bad else (None if failed or not measured else True)))
    at32 = next((r for r in stack or [] if r["seq_len"] == 32768 and r["summary"]), None)
    mfu = None if at32 is None else at32["summary"]["mfu"]
    out.append(Goal("8B-shaped stack MFU at 32K", f">= {MFU_GOAL:.0%}", _num(mfu, "{:.1%}"),
                    None if mfu is None else mfu >= MFU_GOAL))
    return out


def goals_table(found: list[Goal]) -> list[str]:
    return _table(["goal", "target", "measured", "verdict"], [[g.name, g.target, g.measured, g.verdict] for g in found])
