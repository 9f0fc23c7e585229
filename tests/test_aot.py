"""Ahead-of-time compilation of the triton backend for sm_80 / sm_90a without a GPU
(`python -m distattn.kernels.aot`): no failure, no config over its shared memory, no atomic
instruction in any kernel (the backward's determinism); MLA's head dims (192/128) beside the
square ones. Also the SASS loop finder and atomics scan (`distattn.kernels.tools.sass`).

conftest sets TRITON_INTERPRET=1 in this process; the compiles run in subprocesses (or in the AOT
pool's spawned workers) whose environment has no TRITON_* variables."""

import json
import os
import subprocess
import sys

import argparse
import textwrap

import pytest

from distattn.kernels.tools import aot, sass
from distattn.kernels.tools import cases as aot_cases
from distattn.kernels.tools.cases import VARIANTS
from distattn.kernels.triton_attn import KERNELS
from distattn.kernels.triton_plan import all_configs, keep_config

TINY = ["--kernels", "fwd", "--arch", "90", "--dtypes", "bf16", "--head-dims", "64", "--variants", "causal"]
MLA = (192, 128)


def _aot(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    return subprocess.run([sys.executable, "-m", "distattn.kernels.aot", *args], env=env, stdout=subprocess.PIPE,
                          text=True)


# `python -m distattn.kernels.aot` compiles the whole matrix (~1200 kept cases). What limits a config
# (shared memory, registers) depends on the arch, the dtype and the head dims; a variant (every
# HAS_LO/HAS_HI/SOFTCAP/GROUP the kernels can be called with) changes the code around the dots, not
# the tiles a config keeps. The default slices: every arch x element size x head dims from 128 (MLA's
# 192/128 included; fp16 has bf16's bytes, so the same limits) with the heaviest variant (both
# bounds, soft-cap, GQA: the most registers), every kernel and config; and every kernel x variant at
# one arch, dtype and head dim, each with its autotuner's first kept config (the largest tile: the
# most registers), through the AOT tool's own compile_cases -- every kernel, config, arch, dtype,
# head dim from 128 and variant compiled at least once. fp32 keeps one config, the same at every head dim
# (tests/test_aot.py::test_fp32_keeps_one_config_at_every_head_dim): its shared memory grows with the head
# dim, so the default slice compiles it at 256, the most, and --slow's all-head-dims at 128 and 192/128 too.
# Under --slow: all head dims for the common and the heaviest variant, and every variant with every
# config at 128 and at 192/128, each over every arch and dtype (fp16 too).
ALL = (list(aot_cases.ARCHS), list(aot_cases.DTYPES))
MATRIX_SLICES = {   # name: (head dims as (Q/K's, V's), variants, archs, dtypes, slow)
    # 64 is the smallest tile, furthest from every limit: only --slow's all-head-dims compiles it
    "every-limit": (list(aot_cases.HEAD_DIMS[1:]), ["band_softcap"], list(aot_cases.ARCHS), ["bf16"], False),
    "every-limit-fp32": ([aot_cases.HEAD_DIMS[-1]], ["band_softcap"], list(aot_cases.ARCHS), ["fp32"], False),
    "all-head-dims": (list(aot_cases.HEAD_DIMS), ["causal", "band_softcap"], *ALL, True),
    "all-variants": ([(128, 128)], list(VARIANTS), *ALL, True),
    "mla-all-variants": ([MLA], list(VARIANTS), *ALL, True),
}


def _dims_arg(head_dims) -> str:
    return ",".join(aot_cases.dims_name(*pair) for pair in head_dims)


def test_fp32_keeps_one_config_at_every_head_dim():
    """What lets the default slice compile fp32 at head dim 256 alone: at 128 and 192/128 each kernel keeps
    the same configs there, whose tiles (and shared memory) only shrink with the head dim."""
    cases = aot_cases.matrix(list(KERNELS), list(aot_cases.ARCHS), ["fp32"], list(aot_cases.HEAD_DIMS[1:]),
                             ["band_softcap"])
    kept = {}
    for case in cases:
        if case.kept:
            kept.setdefault((case.kernel, case.arch, (case.head_dim, case.head_dim_v)), set()).add(case.config)
    largest = aot_cases.HEAD_DIMS[-1]
    for (kernel, arch, dims), configs in kept.items():
        assert configs == kept[kernel, arch, largest], (kernel, arch, dims)
    assert {(k, a) for k, a, _ in kept} == {(k, a) for k in KERNELS for a in aot_cases.ARCHS}


def test_default_matrix_has_mla_for_both_archs():
    assert MLA in aot_cases.HEAD_DIMS and set(aot_cases.ARCHS) == {80, 90}
    cases = aot_cases.matrix(list(KERNELS), list(aot_cases.ARCHS), ["bf16"], list(aot_cases.HEAD_DIMS), ["causal"])
    kept = {(c.kernel, c.arch) for c in cases if (c.head_dim, c.head_dim_v) == MLA and c.kept}
    assert kept == {(k, a) for k in KERNELS for a in aot_cases.ARCHS}


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("part", [pytest.param(name, marks=[pytest.mark.slow] if spec[-1] else [])
                                  for name, spec in MATRIX_SLICES.items()])
def test_full_matrix_compiles_for_sm80_and_sm90a(part):
    """Every kernel x config x arch x dtype x head dim x variant of the slice: no compile error, no
    kept config over its target's shared memory, and every combination has a kept config that
    compiled."""
    head_dims, variants, archs, dtypes, _ = MATRIX_SLICES[part]
    proc = _aot("--json", "--head-dims", _dims_arg(head_dims), "--variants", ",".join(variants),
                "--arch", ",".join(map(str, archs)), "--dtypes", ",".join(dtypes))
    report = json.loads(proc.stdout)
    rows, summary = report["rows"], report["summary"]
    assert summary["failures"] == 0, summary["failed"]
    assert summary["over_limit"] == []
    assert summary["atomics"] == [] and all(r["atomics"] == [] for r in rows if r["status"] == "ok")
    assert proc.returncode == 0
    _check_machine_use(rows)
    _check_compiled(rows, summary, head_dims, variants, archs, dtypes)


def _check_compiled(rows, summary, head_dims, variants, archs, dtypes):
    compiled = {(r["kernel"], r["arch"], r["dtype"], (r["head_dim"], r["head_dim_v"]), r["variant"])
                for r in rows if r["status"] == "ok"}
    wanted = {(k, aot_cases.ARCHS[a], d, tuple(h), v) for k in KERNELS for a in archs for d in dtypes for h in head_dims
              for v in variants}
    assert wanted - compiled == set()
    assert summary["compiles"] == sum(r["status"] == "ok" for r in rows)


# The default slice of every kernel x variant (sm_90a, bf16, head dim 128, the first kept config): each kernel
# compiles every constexpr both ways -- "full" (all off), "band_softcap_partial" (HAS_LO, HAS_HI, SOFTCAP, GQA and
# fp32 partial outputs on), "causal_row64" (64-bit row offsets) -- and the other variants are dealt over the
# kernels, so every variant compiles with some kernel; "band_softcap" with every kernel and config is the
# every-limit slice above. Every kernel x variant: the "every" case (--slow), and --slow's all-variants matrix
# (every config too, both archs and every dtype).
VARIANT_SLICE = {
    "fwd": ["full", "band_softcap_partial", "causal_row64", "causal", "band", "softcap"],
    "bwd_dkv": ["full", "band_softcap_partial", "causal_row64", "lo_only", "gqa", "lo_only_softcap"],
    "bwd_dq": ["full", "band_softcap_partial", "causal_row64", "full_softcap", "causal_partial"],
}


def test_the_variant_slice_covers_every_variant_and_constexpr():
    assert set(VARIANT_SLICE) == set(KERNELS)
    assert {v for vs in VARIANT_SLICE.values() for v in vs} | {"band_softcap"} == set(VARIANTS)
    assert "band_softcap" in MATRIX_SLICES["every-limit"][1] and not MATRIX_SLICES["every-limit"][-1]
    for kernel, variants in VARIANT_SLICE.items():
        for flag in ("HAS_LO", "HAS_HI", "SOFTCAP", "ROW64"):
            assert {VARIANTS[v][flag] for v in variants} == {False, True}, (kernel, flag)
        assert {VARIANTS[v]["GROUP"] > 1 for v in variants} == {False, True}, kernel
        assert {v.endswith("_partial") for v in variants} == {False, True}, kernel


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("part", ["slice", pytest.param("every", marks=pytest.mark.slow)])
def test_every_variant_of_every_kernel_compiles_for_sm90a(part):
    """Every kernel x variant (sm_90a, bf16, head dim 128; by default VARIANT_SLICE's) with its
    autotuner's first kept config there, compiled as the AOT tool compiles (``compile_cases``, spawned
    workers without TRITON_* variables): no compile error, no kept config over the shared memory, no
    atomic, no spill, the loop's MMAs doing its tile's dots. Every config of every variant: --slow's
    all-variants."""
    wanted = {(k, v) for k in KERNELS for v in (VARIANTS if part == "every" else VARIANT_SLICE[k])}
    cases = aot_cases.matrix(list(KERNELS), [90], ["bf16"], [(128, 128)], list(VARIANTS))
    first = {}
    for case in cases:
        if case.kept:
            first.setdefault((case.kernel, case.variant), case)
    assert len(first) == len(KERNELS) * len(VARIANTS)   # every kernel keeps a config in every variant
    rows = aot_cases.compile_cases([c for key, c in first.items() if key in wanted], jobs=os.cpu_count(), log=None)
    summary = aot.summarize(rows, 0.0)
    assert summary["failures"] == 0, summary["failed"]
    assert summary["over_limit"] == [] and summary["atomics"] == []
    assert all(r["atomics"] == [] for r in rows if r["status"] == "ok")
    _check_machine_use(rows)
    compiled = {(r["kernel"], r["variant"]) for r in rows if r["status"] == "ok"}
    assert compiled == wanted and summary["compiles"] == len(rows) == len(wanted)
    assert all((r["arch"], r["dtype"], r["head_dim"], r["head_dim_v"]) == ("sm_90a", "bf16", 128, 128) for r in rows)


def _check_machine_use(rows):
    """What the tile sizes and stages must give, read from the compiles: at head dims <= 128 every
    kept 16-bit config spills no register (ptxas's own report) and its steady-state loop runs only
    wgmma (HGMMA) on sm_90a, mma.sync (HMMA) on sm_80, doing exactly its tile's multiply-adds: the
    forward's two dots, dK/dV's four (twice the forward's work per tile) and dQ's three (1.5 times),
    none computed twice. Beyond 128 (MLA's 192, 256) the rows report their spills without a bound
    (see kernels/triton_plan.py)."""
    for r in rows:
        if r["status"] != "ok" or r["dtype"] == "fp32" or max(r["head_dim"], r["head_dim_v"]) > 128:
            continue
        label = f"{r['kernel']} {r['config']} {r['arch']} d{r['head_dim']} {r['variant']} {r['dtype']}"
        assert r["spill_bytes"] == 0, f"{label} spills {r['spill_bytes']} B"
        mma = "HGMMA." if r["arch"] == "sm_90a" else "HMMA."
        assert r["loop_mma"] and all(op.startswith(mma) for op in r["loop_mma"]), (label, r["loop_mma"])
        assert r["loop_macs"] == r["tile_macs"], (label, r["loop_macs"], r["tile_macs"])
    assert all(r["spill_bytes"] is not None for r in rows if r["status"] == "ok"), "a compile without ptxas's report"


def test_tile_macs_count_each_kernels_dots():
    """The backward's matrix work per tile against the forward's: dK/dV recompute S and dP and add dV
    and dK (2x), dQ recomputes S and dP and adds dQ (1.5x); head dims padded to a power of two."""
    fwd = aot_cases.tile_macs("fwd", (64, 128, 8, 2), 128, 128)
    assert fwd == 64 * 128 * 256
    assert aot_cases.tile_macs("bwd_dkv", (64, 128, 8, 2), 128, 128) == 2 * fwd
    assert aot_cases.tile_macs("bwd_dq", (64, 128, 8, 2), 128, 128) * 2 == 3 * fwd
    assert aot_cases.tile_macs("fwd", (64, 64, 4, 3), 192, 128) == 64 * 64 * (256 + 128)


def test_ptxas_spill_report_parsing():
    log = """ptxas info    : Compiling entry function '_bwd_dkv_kernel' for 'sm_90a'
ptxas info    : Function properties for _bwd_dkv_kernel
    128 bytes stack frame, 412 bytes spill stores, 136 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 128 bytes cumulative stack size"""
    assert aot_cases.spill_bytes(log) == 548
    assert aot_cases.spill_bytes(log.replace("412", "0").replace("136", "0")) == 0
    assert aot_cases.spill_bytes("") is None  # no report at all: not "no spills"


def test_mma_work_of_a_loop():
    """``sass.mma_macs``: a wgmma counts once per warpgroup, an mma.sync once per warp."""
    def loop(*opcodes):
        return sass.Loop(0, len(opcodes), [sass.Instruction(i, op, op) for i, op in enumerate(opcodes)])
    hopper = loop("HGMMA.64x128x16.F32.BF16", "HGMMA.64x32x16.F32.BF16", "FFMA", "MUFU.EX2")
    assert sass.mma_macs(hopper, num_warps=8) == 2 * (64 * 128 * 16 + 64 * 32 * 16)
    ampere = loop("HMMA.16816.F32.BF16", "HMMA.1688.F32.TF32")
    assert sass.mma_macs(ampere, num_warps=4) == 4 * (16 * 8 * 16 + 16 * 8 * 8)


def test_json_shape_on_a_tiny_subset():
    proc = _aot(*TINY, "--json")
    assert proc.returncode == 0
    report = json.loads(proc.stdout)
    rows, summary = report["rows"], report["summary"]
    configs = all_configs("fwd")
    kept = [keep_config("fwd", c, 64, 2, 90) for c in configs]
    assert len(rows) == len(configs) and any(kept) and not all(kept)  # the fp32 config is not for bf16
    assert [r["status"] for r in rows] == ["ok" if k else "pruned" for k in kept]
    assert all(r["registers"] is None for r in rows if r["status"] == "pruned")
    for row in (r for r in rows if r["status"] == "ok"):
        assert (row["kernel"], row["arch"], row["dtype"], row["head_dim"], row["head_dim_v"], row["variant"]) == (
            "fwd", "sm_90a", "bf16", 64, 64, "causal")
        assert row["atomics"] == []
        assert 0 < row["registers"] <= 255 and row["stack"] >= 0 and row["seconds"] > 0
        # Triton's dynamic shared memory plus the 1 KiB ptxas reserves with wgmma on sm_90a
        assert row["shared"] == row["shared_dynamic"] + row["shared_static"] and row["shared_static"] == 1024
        assert not row["over_limit"]
    m, n, w, s = configs[0]
    assert rows[0]["config"] == f"{m}x{n} w{w} s{s}"
    assert summary["compiles"] == sum(kept) and summary["failures"] == 0 and summary["over_limit"] == []
    assert summary["pruned"] == len(configs) - sum(kept) and summary["worst_stack"] is not None
    assert set(summary) >= {"compile_seconds", "wall_seconds", "max_shared"} and summary["atomics"] == []


def test_head_dims_argument():
    """A pair names (Q/K's, V's) head dim; a single number means both."""
    assert aot._head_dims("64,192/128") == [(64, 64), (192, 128)]
    for bad in ("0", "300", "192/", "a/b", "1/2/3"):
        with pytest.raises(argparse.ArgumentTypeError, match="want D or DQK/DV"):
            aot._head_dims(bad)
    case = aot_cases.matrix(["bwd_dq"], [90], ["bf16"], [MLA], ["gqa"])[0]
    assert (case.head_dim, case.head_dim_v) == MLA and "d192/128" in case.label
    assert aot_cases.matrix(["bwd_dq"], [90], ["bf16"], [64], ["gqa"])[0].head_dim_v == 64
    _, _, constexprs = aot_cases.aot_spec("bwd_dkv", "bf16", 192, "gqa", head_dim_v=128)
    assert (constexprs["HEAD_DIM"], constexprs["BLOCK_D"], constexprs["HEAD_DIM_V"], constexprs["BLOCK_DV"]) == (
        192, 256, 128, 128)


def test_resource_usage_line_parsing():
    text = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _fwd_kernel:
  REG:245 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:664 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function other:
  REG:32 STACK:0 SHARED:0 LOCAL:8 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    usage = aot_cases.parse_resource_usage(text)
    assert usage["_fwd_kernel"]["REG"] == 245 and usage["_fwd_kernel"]["STACK"] == 16
    assert usage["_fwd_kernel"]["SHARED"] == 1024 and usage["_fwd_kernel"]["CONSTANT[0]"] == 664
    assert usage["other"] == {"REG": 32, "STACK": 0, "SHARED": 0, "LOCAL": 8, "CONSTANT[0]": 400, "TEXTURE": 0,
                              "SURFACE": 0, "SAMPLER": 0}


def test_divisibility_attrs_mark_pointers_and_strides_but_not_lse_delta():
    fn, signature, _ = aot_cases.aot_spec("bwd_dq", "bf16", 128, "gqa")
    marked = {fn.arg_names[i] for (i,) in aot_cases.divisibility_attrs(fn, signature)}
    assert {"Q", "LSE", "DELTA", "CU_Q", "LO", "HI", "TILES", "stride_qt", "stride_kh", "stride_dqh"} <= marked
    assert not marked & {"stride_lt", "stride_lh", "stride_dt", "stride_dh", "scale", "qk_mult", "cap_in",
                         "HEAD_DIM", "HAS_LO", "SOFTCAP"}
    assert signature["LO"] == signature["HI"] == "*i32" and signature["cap_in"] == "fp32"


def test_variants_cover_every_mask_and_softcap_constexpr():
    """Every (HAS_LO, HAS_HI, SOFTCAP) a call can take is an AOT variant, with GQA (GROUP > 1) too."""
    combos = {(v["HAS_LO"], v["HAS_HI"], v["SOFTCAP"]) for v in VARIANTS.values()}
    assert combos == {(lo, hi, cap) for lo in (False, True) for hi in (False, True) for cap in (False, True)}
    assert any(v["GROUP"] > 1 for v in VARIANTS.values())
    for kernel in KERNELS:
        _, signature, constexprs = aot_cases.aot_spec(kernel, "fp16", 64, "band_softcap")
        assert set(constexprs) | {"BLOCK_M", "BLOCK_N"} == {k for k, t in signature.items() if t == "constexpr"}


def test_atomics_scan_on_canned_sass_and_ptx():
    """ATOM/RED (global, shared, TMA) count; REDUX and redux.sync (warp reductions in registers) do not."""
    text = """
        /*0000*/                   REDUX.SUM UR4, R2 ;
        /*0010*/                   ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, R4, [R2.64], R5 ;
        /*0020*/              @!P0 RED.E.ADD.F32.FTZ.RN.STRONG.GPU [R2.64], R5 ;
        /*0030*/                   ATOMS.ADD R6, [R7], R8 ;
        /*0040*/                   STG.E [R2.64], R5 ;
"""
    assert sass.atomics(text) == ["ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU", "RED.E.ADD.F32.FTZ.RN.STRONG.GPU", "ATOMS.ADD"]
    ptx = textwrap.dedent("""
        redux.sync.add.s32 %r1, %r2, -1;
        @%p1 atom.global.gpu.acq_rel.add.f32 %f1, [%rd1], %f2;
        red.shared.add.u32 [%r3], 1;
        cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%rd2, {%r4, %r5}], [%r6];
        st.global.b32 [%rd1], %r1;
    """)
    assert sass.ptx_atomics(ptx) == ["atom.global.gpu.acq_rel.add.f32", "red.shared.add.u32",
                                     "cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group"]
    assert sass.atomics("") == [] and sass.ptx_atomics("") == []


def test_atomics_scan_finds_a_compiled_atomic(tmp_path):
    """The scan is not vacuous: a kernel with tl.atomic_add, compiled like the AOT cases, is caught."""
    (tmp_path / "atomic_probe.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def add_one(X):
            tl.atomic_add(X + tl.arange(0, 32), 1.0)
    """))
    script = textwrap.dedent("""
        import json, sys, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from atomic_probe import add_one
        from distattn.kernels.tools.sass import atomics, disassemble, ptx_atomics
        kernel = triton.compile(ASTSource(add_one, {"X": "*fp32"}, {}), target=GPUTarget("cuda", 90, 32))
        print(json.dumps([atomics(disassemble(kernel.asm["cubin"])), ptx_atomics(kernel.asm["ptx"])]))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    assert proc.returncode == 0
    in_sass, in_ptx = json.loads(proc.stdout.splitlines()[-1])
    assert in_sass and all(op.startswith(("ATOM", "RED")) for op in in_sass)
    assert in_ptx and all(op.startswith(("atom.", "red.")) for op in in_ptx)


CANNED_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/              @!P0 BRA 0x70 ;
        /*0030*/                   MUFU.EX2 R2, R3 ;
        /*0040*/                   FFMA R2, R2, R3, R4 ;
        /*0050*/               @P1 BRA 0x10 ;
        /*0060*/                   EXIT ;
        /*0070*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R5 ;
        /*0080*/              @!P0 BRA 0x70 ;
        /*0090*/                   BRA 0x30 ;
        /*00a0*/                   BRA 0xa0;
"""


def test_loop_finder_on_canned_sass():
    """The loop 0x10-0x50, and the spin wait after the EXIT; not the out-of-line block's jump back."""
    found = sass.loops(CANNED_SASS)
    assert [(loop.start, loop.end) for loop in found] == [(0x10, 0x50), (0x70, 0x80)]
    body = found[0]
    assert body.size == 5 and body.counts["mma"] == 1 and body.counts["exp"] == 1 and body.counts["ffma"] == 1
    assert sass.full_tile_loop(found) is body


@pytest.mark.parametrize("arch, mma, variant", [(80, "HMMA", "causal"), (90, "HGMMA", "causal"),
                                               (90, "HGMMA", "band_softcap")])
def test_loop_finder_finds_the_full_key_tile_loop(arch, mma, variant):
    """A small forward kernel: its full-tile loop has the MMAs and no mask selects (also with a
    two-sided band and the soft-cap, whose tanh is one MUFU op); the masked loop at the band's
    edges has selects."""
    case = aot_cases.Case("fwd", (64, 64, 4, 3), arch, "bf16", 64, variant, True)
    row = aot_cases.compile_cases([case], jobs=1, keep_cubin=True, log=None)[0]
    assert row["status"] == "ok", row.get("error")
    text = sass.disassemble(row["cubin"])
    found = sass.loops(text)
    with_mma = [loop for loop in found if loop.counts.get("mma")]
    assert len(with_mma) >= 2
    full = sass.full_tile_loop(found)
    assert full is not None and full.counts.get("select", 0) == 0 and full.counts["exp"] > 0
    assert any(ins.opcode.startswith(mma) for ins in full.instructions)
    if variant.endswith("softcap"):
        assert any(ins.opcode.startswith("MUFU.TANH") for ins in full.instructions)
    assert max(loop.counts.get("select", 0) for loop in with_mma) > 0
