"""``distattn bench --quick`` leaves DeepSpeed out, and the full bench says before DeepSpeed's one-time C++
build that it comes and keeps it out of the ETA (issue 79: a ~200 s build once made the ETA "1 h 27 min")."""

import pytest
import torch

from distattn.bench.suite import BenchConfig, BenchProgress, Case, bench_cases, deepspeed_build_note
from distattn.cli import build_parser


def test_quick_leaves_deepspeed_out_unless_asked():
    assert BenchConfig().peers and not BenchConfig.quick().peers and BenchConfig.quick(peers=True).peers
    tiny = dict(world_sizes=(2,), seq_lens=(256,), masks=("causal",), schedulers=("ring",))
    assert [c.name for c in bench_cases(BenchConfig.quick(**tiny))] == ["ring"]
    assert [c.name for c in bench_cases(BenchConfig.quick(peers=True, **tiny))] == ["ring", "deepspeed-ulysses"]
    parse = build_parser().parse_args
    assert [parse(["bench", "--out", "b", *flag]).peers for flag in ([], ["--peers"], ["--no-peers"])] == \
        [None, True, False]
    with pytest.raises(SystemExit):
        parse(["bench", "--out", "b", "--peers", "--no-peers"])


def _row():
    return {"fwd_bwd_ms": 1.0, "tflops": 1e-3, "flops_imbalance": 1.0}


def test_the_eta_leaves_out_the_first_deepspeed_case():
    """Its seconds are DeepSpeed's import and build: counted, the ETA would spread 200 s over every case."""
    cases = [Case(2, 256, "causal", "ring", 1.0), Case(2, 256, "causal", "deepspeed-ulysses", 1.0),
             Case(2, 256, "causal", "zigzag", 1.0), Case(2, 256, "causal", "deepspeed-ulysses", 1.0),
             Case(2, 256, "causal", "cad", 1.0)]
    lines = []
    show = BenchProgress(cases, bar=False, say=lines.append)
    show.done(0, 2.0, _row())
    show.done(1, 200.0, _row())   # the build
    assert lines[-1].endswith("ETA 6 s"), lines   # 3 cases left at the 2 s the clocked one took
    show.done(2, 2.0, _row())
    show.done(3, 2.0, _row())     # a later DeepSpeed case is clocked like any other
    assert lines[-1].endswith("ETA 2 s") and lines[-1].startswith("bench: case 4/5 "), lines


def test_the_build_is_announced_with_its_cache_folder(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on CUDA DeepSpeed builds no CPU op")
    note = deepspeed_build_note(str(tmp_path))
    assert "compiles" in note and "once" in note and str(tmp_path) in note and "--no-peers" in note
    (tmp_path / "deepspeed_shm_comm").mkdir()
    assert "reuses" in deepspeed_build_note(str(tmp_path))
