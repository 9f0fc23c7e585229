"""`distattn bench` shows its progress (issue 58): the case count known before the first rank starts, a
tqdm bar on a terminal, else one line per finished case with ``k/N`` and an ETA weighted by the cases'
mask areas; the results are the same either way."""

import io
import re

from tqdm import tqdm

import distattn.distributed.spawn
import distattn.train.metrics
from distattn.bench import suite
from distattn.bench.suite import BenchConfig, BenchProgress, Case, bench_cases, run_bench

TINY = BenchConfig(world_sizes=(1, 2), seq_lens=(128, 256), masks=("causal", "causal-doc"),
                   schedulers=("ring", "ulysses"), peers=False, repeats=1, warmup=0)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _row(case: Case) -> dict:
    return {"scheduler": case.name, "world_size": case.world, "seq_len": case.seq_len, "mask": case.mask,
            "fwd_bwd_ms": 12.5, "tflops": 0.004, "flops_imbalance": 1.0}


def test_the_cases_are_counted_before_any_rank_starts():
    cases = bench_cases(TINY)
    # one rank runs only "local"; two run every scheduler, per (length, mask)
    assert [c.name for c in cases[:4]] == ["local"] * 4 and len(cases) == 4 + 2 * 2 * 2
    assert [(c.world, c.seq_len, c.mask) for c in cases[:2]] == [(1, 128, "causal"), (1, 128, "causal-doc")]
    assert cases[-1].label() == "ulysses, causal-doc, 2 ranks, 256"
    assert Case(4, 8192, "causal", "zigzag", 1.0).label() == "zigzag, causal, 4 ranks, 8K"
    # DeepSpeed's row appears only with peers, on documents (not slice masks) its head split allows
    peers = bench_cases(BenchConfig(world_sizes=(2,), seq_lens=(256,), masks=("causal", "prefix-lm"),
                                    schedulers=("ring",), peers=True))
    assert [(c.mask, c.name) for c in peers] == [("causal", "ring"), ("causal", "deepspeed-ulysses"),
                                                ("prefix-lm", "ring")]


def test_off_a_terminal_each_case_is_a_line_with_its_count_and_a_weighted_eta():
    cases = [Case(2, 2048, "causal", "ring", 1.0), Case(2, 2048, "causal", "zigzag", 1.0),
             Case(2, 4096, "causal", "ring", 2.0)]
    lines, clock = [], _Clock()
    show = BenchProgress(cases, bar=False, say=lines.append, clock=clock)
    assert show.bar is None and show.eta() is None
    clock.now = 15.0   # the ranks' start is not the case's: the ETA goes by the case's own 10 s
    show.done(0, 10.0, _row(cases[0]))
    # 10 s for weight 1 of 4: 30 s left (a mean per case would say 20)
    assert lines[-1] == ("bench: case 1/3 (ring, causal, 2 ranks, 2K) 10.0 s: 12.5 ms, 4.00 GFLOP/s, imb 1.00; "
                         "ETA 30 s")
    clock.now = 20.0
    show.done(1, 10.0, _row(cases[1]))
    assert lines[-1].startswith("bench: case 2/3 (zigzag, causal, 2 ranks, 2K) 10.0 s") and lines[-1].endswith(
        "ETA 20 s")
    clock.now = 200.0
    show.done(2, 180.0, _row(cases[2]))
    assert lines[-1].startswith("bench: case 3/3 ") and lines[-1].endswith("ETA 0 s")
    show.note("world size 4: 0 cases")
    assert lines[-1] == "world size 4: 0 cases"
    show.close()


def test_a_case_that_cannot_run_leaves_the_total():
    cases = [Case(2, 256, "causal", "ring", 1.0), Case(2, 256, "causal", "deepspeed-ulysses", 1.0),
             Case(2, 256, "causal", "zigzag", 1.0)]
    lines, clock = [], _Clock()
    show = BenchProgress(cases, bar=False, say=lines.append, clock=clock)
    clock.now = 1.0
    show.done(0, 1.0, _row(cases[0]))
    show.done(1, 0.1, None)
    clock.now = 2.0
    show.done(2, 1.0, _row(cases[2]))
    assert "skipped" in lines[1] and lines[2].startswith("bench: case 2/2 (zigzag")


def test_on_a_terminal_a_tqdm_bar_counts_the_cases():
    cases = [Case(2, 2048, "causal", "ring", 1.0), Case(2, 4096, "causal", "ring", 3.0)]
    out = io.StringIO()
    show = BenchProgress(cases, bar=True, say=None, file=out)
    assert isinstance(show.bar, tqdm) and show.bar.total == 4.0
    show.done(0, 2.0, _row(cases[0]))
    assert show.bar.n == 1.0
    show.close()
    text = out.getvalue()
    # the running case beside the bar, the finished one's result above it
    assert "bench 0/2" in text and "bench 1/2" in text and "ring, causal, 2 ranks, 4K" in text
    assert "ring, causal, 2 ranks, 2K: 12.5 ms" in text and "25%" in text


def _instant_ranks(monkeypatch):
    """run_distributed as rank 0 would report: every case of the world at once, no process started."""
    def fake(fn, world, cfg, world_again, mine, events, **kw):
        assert fn is suite._rank_main and world == world_again
        rows = [_row(c) for _, c in mine]
        if events is not None:
            for (i, _), row in zip(mine, rows):
                events.put((i, 0.01, row))
        return [rows]
    monkeypatch.setattr(distattn.distributed.spawn, "run_distributed", fake)
    monkeypatch.setattr(suite, "write_results", lambda rows, out, cfg: None)


def test_run_bench_reports_every_case_of_every_world(monkeypatch, tmp_path):
    _instant_ranks(monkeypatch)
    lines = []
    monkeypatch.setattr(suite, "_log", type("Log", (), {"info": staticmethod(lines.append)}))
    rows = run_bench(TINY, tmp_path / "out", bar=False)
    assert len(rows) == 12
    counts = [re.match(r"bench: case (\d+)/(\d+) \(.*\) [\d.]+ s: .*; ETA \d+ s$", line) for line in lines
              if line.startswith("bench: case")]
    assert all(counts) and [int(m[1]) for m in counts] == list(range(1, 13)) and {m[2] for m in counts} == {"12"}
    assert lines[0].startswith("world size 1: 4 cases") and lines[5].startswith("world size 2: 8 cases")
    assert lines[-1].endswith(f"-> {tmp_path / 'out' / 'results.csv'}")


def test_run_bench_takes_the_trainers_terminal_decision(monkeypatch, tmp_path):
    _instant_ranks(monkeypatch)
    made = []

    class Spy(BenchProgress):
        def __init__(self, cases, bar, say=print, **kw):
            super().__init__(cases, bar, say=say, file=io.StringIO(), **kw)
            made.append(self)
    monkeypatch.setattr(suite, "BenchProgress", Spy)
    monkeypatch.setattr(distattn.train.metrics, "resolve_progress", lambda progress: "bar")
    run_bench(TINY, tmp_path, bar=None)
    assert isinstance(made[-1].bar, tqdm) and made[-1].count == 12
    monkeypatch.setattr(distattn.train.metrics, "resolve_progress", lambda progress: "log")
    run_bench(TINY, tmp_path, bar=None)
    assert made[-1].bar is None
    run_bench(TINY, tmp_path, progress=False)   # no display at all
    assert len(made) == 2


def test_real_ranks_report_each_case(monkeypatch, tmp_path):
    # two gloo ranks, two tiny cases: rank 0's events really cross the process boundary
    lines = []
    monkeypatch.setattr(suite, "_log", type("Log", (), {"info": staticmethod(lines.append)}))
    cfg = BenchConfig(world_sizes=(2,), seq_lens=(128,), masks=("causal",), schedulers=("ring", "ulysses"),
                      peers=False, repeats=1, warmup=0)
    rows = run_bench(cfg, tmp_path, bar=False)
    assert [r["scheduler"] for r in rows] == ["ring", "ulysses"]
    cases = [line for line in lines if line.startswith("bench: case")]
    assert [line.split(" (")[0] for line in cases] == ["bench: case 1/2", "bench: case 2/2"], lines
    assert all(" ETA " in line for line in cases)
