"""Issue 77 item 1: the attention kernel's tile model (distattn.costmodel.tiles) -- CTAs in waves over the SMs,
per direction, each a fixed cost plus its loop iterations -- fitted to a latency table, shipped for
H100/H200, and ``distattn cluster kernel-fit``. Seconds."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from distattn.costmodel import tiles
from distattn.cli import main
from distattn.kernels.speed import gpu_of, kernel_model

TABLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "profiles" / "attn_latency_h100.csv"
TRUE = tiles.TileModel(*tiles.grids(fixed=6.0, fwd_iter_s=1.0e-6, bwd_iter_s=3.2e-6, lone=0.8), sms=132,
                       call_s=12e-6, source="synthetic")


def _table():
    if not TABLE.exists():
        pytest.skip("shared profiles not present")
    return TABLE


def _write(path, rows, columns):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _synthetic(path, model=TRUE, apart=False):
    """A table ``model`` times exactly: DistCA's shape (L, cp, tp) read as forward + backward, or (apart)
    shape-named rows, each direction on its own."""
    if not apart:
        rows = []
        for L in (256, 1024, 4096, 16384, 65536):
            for cp in (1, 2, 8):
                for tp in (1, 8):
                    q, k = tiles.distca_shape(L, cp)
                    row = tiles.KernelRow(L, cp, tp, q, k, 32 / tp, "both", 1.0)
                    rows.append({"L": L, "cp": cp, "tp": tp,
                                 "duration_per_doc": float(tiles.predict(model, [row])[0]) * 1e3})
        return _write(path, rows, ["L", "cp", "tp", "duration_per_doc"])
    rows = []
    for q, k in ((512, 32768), (1282, 131072), (4096, 131072), (8192, 8192), (32768, 32768), (128, 512)):
        for direction in tiles.DIRECTIONS:
            row = tiles.KernelRow(k, 1, 1, q, k, 32, direction, 1.0)
            rows.append({"q_len": q, "k_len": k, "heads": 32, "segments": 1, "direction": direction,
                         "backend": "triton", "ms": float(tiles.predict(model, [row])[0]) * 1e3})
    return _write(path, rows, ["q_len", "k_len", "heads", "segments", "direction", "backend", "ms"])


def test_a_fit_recovers_the_model_that_made_its_table(tmp_path):
    got = tiles.fit(tiles.read_table(_synthetic(tmp_path / "both.csv")))
    f, b = got.forward, got.backward
    # forward + backward rows tell the directions apart only through their grids: the backward's
    # iteration is BWD_ITER_RATIO times the forward's
    assert f.fixed == pytest.approx(6.0, rel=0.05) and got.call_s == pytest.approx(12e-6, rel=0.05)
    assert b.iter_s / f.iter_s == pytest.approx(tiles.BWD_ITER_RATIO)
    # each direction timed apart: both iterations fitted, and the model's own times come back
    apart = tiles.read_table(_synthetic(tmp_path / "apart.csv", apart=True))
    got = tiles.fit(apart)
    assert got.forward.iter_s == pytest.approx(1.0e-6, rel=0.03) and got.backward.iter_s == pytest.approx(3.2e-6, rel=0.03)
    assert max(abs(r["error"]) for r in tiles.check(got, apart)) < 0.02


def test_the_shipped_h100_fit_is_the_fit_of_the_table():
    rows = tiles.read_table(_table())
    assert len(rows) == 176 and {r.direction for r in rows} == {"both"}
    refit = tiles.fit(rows)
    for a, b in ((refit.forward, tiles.H100.forward), (refit.backward, tiles.H100.backward)):
        assert a.iter_s == pytest.approx(b.iter_s, rel=0.01) and a.fixed == pytest.approx(b.fixed, rel=0.01)
    errors = np.abs([r["error"] for r in tiles.check(tiles.H100, rows)])
    measured = np.asarray([r.seconds for r in rows])
    work = measured >= 2 * measured.min()        # rows whose time is mostly work, not the call's fixed cost
    assert np.median(errors) <= 0.05 and errors.max() <= 0.25 and errors[work].max() <= 0.19
    # fitted on whole documents (cp = 1) only, the cp > 1 rows are predictions
    whole = tiles.fit([r for r in rows if r.cp == 1])
    held = np.asarray([r.cp > 1 for r in rows])
    errors = np.abs([r["error"] for r in tiles.check(whole, rows)])
    assert np.median(errors[held]) <= 0.10 and errors[held & work].max() <= 0.20


def test_a_short_query_task_runs_its_backward_slower_per_pair():
    """CAD's task at 256 GPUs / 512K on ProLong: 1,282 query rows against 131K keys. Its forward loops
    long (few CTAs); its backward runs 1,024 key-block CTAs per head, each looping ~20 times plus its
    fixed cost."""
    m = kernel_model("h100")
    whole = 131072 * 131073 / 2
    task = 1282 * (131072 - 641)
    per_pair = {d: (float(m.segment_seconds(d, 1282, 131072, task, 32)) / task,
                    float(m.segment_seconds(d, 131072, 131072, whole, 32)) / whole) for d in tiles.DIRECTIONS}
    assert 0.95 < per_pair["forward"][0] / per_pair["forward"][1] < 1.1
    assert 1.3 < per_pair["backward"][0] / per_pair["backward"][1] < 1.8
    # additive over tasks (the planner's) = a rank's call, wherever the SMs are full
    rank = m.rank_seconds("backward", [0, 0], [1282, 4096], [131072, 131072], [task, 4096 * 129024], 1, 32)[0]
    assert rank == pytest.approx(sum(float(m.segment_seconds("backward", q, 131072, a, 32))
                                     for q, a in ((1282, task), (4096, 4096 * 129024))))


def test_few_ctas_wait_for_their_longest():
    """A call whose CTAs do not fill the SMs lasts its longest CTA's critical path: one head of a 2K
    document runs slower per FLOP than 32 heads of it (Ulysses' share of the heads), a long one not."""
    m = kernel_model("h100")
    for L, slower in ((2048, True), (65536, False)):
        one, all_ = (float(m.document_tflops("forward", L, h, 128)) for h in (1, 32))
        assert (one < 0.9 * all_) == slower, (L, one, all_)


def test_levels_and_gpus():
    m = kernel_model("h100")
    assert float(m.document_tflops("forward", 32768, 32, 128)) == pytest.approx(435.0)
    assert float(m.document_tflops("backward", 32768, 32, 128)) == pytest.approx(2.5 / (3.5 / 309 - 1 / 340))
    assert kernel_model("h200") == kernel_model("gh200") == m     # sm_90 parts share the report's level
    a100 = kernel_model("a100")
    assert float(a100.document_tflops("forward", 32768, 32, 128)) == pytest.approx(435.0 * 312 / 989)
    assert "scaled to a100" in a100.source and a100.forward.fixed == m.forward.fixed
    with pytest.raises(ValueError, match="gpu='tpu' is not a GPU distattn knows; choose one of a100"):
        gpu_of("tpu")


def test_bad_tables_are_named(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("L,cp,tp\n64,1,1\n")
    with pytest.raises(ValueError, match=r"kernel table .*bad.csv: line 2.*expected columns L, cp, tp"):
        tiles.read_table(bad)
    bad.write_text("q_len,k_len,heads,direction,ms\n" + "64,32,8,forward,0.1\n" * 4)
    with pytest.raises(ValueError, match="0 < q_len <= k_len"):
        tiles.read_table(bad)
    bad.write_text("q_len,k_len,heads,direction,ms\n" + "64,64,8,sideways,0.1\n" * 4)
    with pytest.raises(ValueError, match="direction 'sideways'"):
        tiles.read_table(bad)
    bom = _synthetic(tmp_path / "bom.csv")
    bom.write_bytes(b"\xef\xbb\xbf" + bom.read_bytes())   # Excel's UTF-8: the first column is still L
    assert len(tiles.read_table(bom)) == 30


def test_kernel_fit_cli(tmp_path, capsys):
    path = str(_synthetic(tmp_path / "lat.csv"))
    assert main(["cluster", "kernel-fit", path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["worst_error"] < 0.02 and out["median_error"] <= out["worst_error"] and out["fit_on"] is None
    assert set(out["rows"][0]) >= {"L", "cp", "tp", "measured_ms", "model_ms"} and len(out["rows"]) == 30
    assert main(["cluster", "kernel-fit", path, "--fit-on", "cp=1", "--check"]) == 0
    text = capsys.readouterr().out
    assert "the 20 rows the fit did not see" in text and text.count("  *") == 20
    assert main(["cluster", "kernel-fit", path, "--fit-on", "cp=1", "--json"]) == 0
    held = json.loads(capsys.readouterr().out)
    assert held["fit_on"] == "cp=1" and held["predicted_worst_error"] is not None
    with pytest.raises(SystemExit) as stop:
        main(["cluster", "kernel-fit", path, "--fit-on", "cp=3"])
    assert "leaves 0 of 30 rows" in str(stop.value.code)
    with pytest.raises(SystemExit):
        main(["cluster", "kernel-fit", path, "--fit-on", "heads"])
    assert "KEY=VALUE" in capsys.readouterr().err


def test_the_gpu_reports_kernel_table_is_what_kernel_fit_reads(tmp_path):
    """``python -m distattn.kernels.bench --table`` (the GPU report's kernel rows) writes the table
    format kernel-fit reads: a CPU run checks the bookkeeping."""
    import torch

    from distattn.kernels.tools import bench

    rows = bench.run([128], [(32, 32)], torch.float32, 128, 64, masks=("causal",), backends=("torch",),
                     rep_budget_s=0.0, device="cpu", cad_shapes=[(16, 128), (64, 256)], heads_head_dim=32)
    assert [r["cad_shape"] for r in rows] == [False, True, True] and all(r["fwd_ms"] for r in rows)
    path = tmp_path / "kernels.csv"
    bench.write_table(rows, str(path))
    read = tiles.read_table(path)
    assert [(r.q_len, r.k_len, r.segments, r.direction, r.backend) for r in read][::2] == \
        [(128, 128, 1, "forward", "torch"), (16, 128, 1, "forward", "torch"), (64, 256, 1, "forward", "torch")]
    with pytest.raises(SystemExit):
        bench.main(["--cad-shapes", "300:200"])
