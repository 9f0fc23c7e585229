"""Network profiles: alpha-beta fits (synthetic and the real H100 profile), `distattn cluster probe` on gloo,
and the nccl-tests runner driven through stand-in binaries that print real-looking output."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distattn.cluster.nccl_tests import measurements_from_output, run_nccl_tests
from distattn.costmodel.network import Measurement, NetworkProfile, bus_factor, default_profile, fit_alpha_beta

EXE = str(Path(sys.executable).with_name("distattn"))
H100 = Path(__file__).resolve().parents[2] / "shared" / "data" / "profiles" / "nccl_perf_h100.csv"


def test_fit_recovers_alpha_and_bus_bandwidth():
    sizes = [2**k for k in range(12, 28)]
    for op, n in (("all_gather", 8), ("send_recv", 2), ("all_reduce", 4)):
        times = [30.0 + bus_factor(op, n) * s / 200e3 for s in sizes]  # 30 us + 200 GB/s
        f = fit_alpha_beta(op, n, sizes, times)
        assert f.alpha_us == pytest.approx(30.0, rel=1e-6) and f.fit_busbw_gbs == pytest.approx(200.0, rel=1e-6)
        # the line's asymptote is never reached: predictions use at most the best measured bandwidth
        best = max(bus_factor(op, n) * s / (t * 1e3) for s, t in zip(sizes, times))
        assert f.capped and f.busbw_gbs == pytest.approx(best) and f.max_rel_err < 1e-9
        assert float(f.time_s(op, n, sizes[5])) * 1e6 == pytest.approx(times[5])


def test_extrapolation_and_inter_node_cap():
    p = NetworkProfile(tuple(Measurement("all_gather", n, s, 10.0 * (n - 1) + 0.875 * s / 300e3)
                             for n in (2, 8) for s in (2**20, 2**26)), gpus_per_node=8)
    assert set(p.fits) == {("all_gather", 2, 1), ("all_gather", 8, 1)}
    inside, across = p.fit("all_gather", 4), p.fit("all_gather", 64)
    assert inside.busbw_gbs > 100 and across.busbw_gbs == p.inter_busbw_gbs
    assert across.alpha_us > p.fit("all_gather", 8).alpha_us
    # ops never measured borrow all_gather's fit; one rank costs nothing
    assert p.fit("all_to_all", 8).busbw_gbs == p.fit("all_gather", 8).busbw_gbs
    assert float(p.time("send_recv", 1, 1 << 20)) == 0.0
    again = NetworkProfile.from_json(json.loads(json.dumps(p.to_json())))
    assert again.fits == p.fits
    with pytest.raises(ValueError, match="rows need op"):
        NetworkProfile.from_json({"rows": [{"op": "all_gather"}]})
    with pytest.raises(ValueError, match="unknown collective"):
        NetworkProfile((Measurement("broadcast", 2, 1, 1.0),)).fit("broadcast", 2)
    assert default_profile().fit("send_recv", 16).busbw_gbs == 45.0


def _latency_bound():
    """A gloo-like probe: ~1 ms per message up to 1 MiB, so the line through those points is steep
    (15.8 GB/s), and the best bus bandwidth ever measured, 1.09 GB/s, at 2 MiB."""
    sizes = [2**k for k in range(22)]
    return sizes, [1000.0 + s / 15.8e3 for s in sizes[:-1]] + [sizes[-1] / 1.09e3]


def test_fit_never_predicts_more_than_was_measured(tmp_path):
    sizes, times = _latency_bound()
    f = fit_alpha_beta("send_recv", 2, sizes, times)
    assert f.fit_busbw_gbs > 3.5  # what least squares says (it used to be the reported bandwidth)
    assert f.capped and f.busbw_gbs <= 1.09 and f.busbw_gbs == pytest.approx(1.09, rel=1e-4)
    assert 0 < f.rms_rel_err <= f.max_rel_err < 0.25
    # past the largest measured size the extra bytes move at the best measured bandwidth
    assert float(f.time_s("send_recv", 2, 2**26)) == pytest.approx(times[-1] * 1e-6 + (2**26 - 2**21) / 1.09e9)
    grid = np.logspace(0, 36, 300, base=2)
    assert np.all(grid / f.time_s("send_recv", 2, grid) <= f.busbw_gbs * 1e9 * (1 + 1e-12))
    assert np.all(np.diff(f.time_s("send_recv", 2, grid)) > 0)
    # other world sizes borrow the cap and the measured range
    p = NetworkProfile(tuple(Measurement("send_recv", 2, s, t) for s, t in zip(sizes, times)), source="gloo probe")
    assert p.fit("send_recv", 4).busbw_gbs <= 1.09 and p.fit("all_gather", 8).max_bus_bytes == 2**21
    p.save(tmp_path / "lat.json")
    saved = json.loads((tmp_path / "lat.json").read_text())["fits"][0]
    assert saved["capped"] and saved["busbw_gbs"] <= 1.09 and saved["max_rel_err"] == pytest.approx(f.max_rel_err)
    out = subprocess.run([EXE, "cluster", "fit", str(tmp_path / "lat.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "busbw     1.090 GB/s" in out.stdout and f"fit error max {f.max_rel_err:.1%}" in out.stdout
    assert "capped at the best measured" in out.stdout


def test_measurements_that_are_not_data_are_refused(tmp_path):
    for bad in (-5.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="all_gather on 2 ranks, 1024 B: time_us is"):
            Measurement("all_gather", 2, 1024, bad)
    with pytest.raises(ValueError, match="size_bytes >= 0"):
        Measurement("all_gather", 2, -1024, 5.0)
    # json.loads reads Infinity; CSV float() reads nan and negatives: each names its row
    path = tmp_path / "inf.json"
    path.write_text('{"rows": [{"op": "all_gather", "world_size": 2, "size_bytes": 1024, "time_us": 5.0},'
                    ' {"op": "all_gather", "world_size": 2, "size_bytes": 2048, "time_us": Infinity}]}')
    with pytest.raises(ValueError, match=r"rows\[1\]: all_gather on 2 ranks, 2048 B: time_us is inf"):
        NetworkProfile.load(path)
    path = tmp_path / "neg.csv"
    path.write_text("op,ngpu,size_bytes,t_us_out\nall_gather,2,1024,5.0\nall_gather,2,2048,-3\n")
    with pytest.raises(ValueError, match="neg.csv: line 3: .*time_us is -3.0"):
        NetworkProfile.load(path)
    zero = FAKE_LOG.format(lo=1, hi=2).replace("27.80", " 0.00")
    with pytest.raises(ValueError, match="2097152 B: time_us is 0.0"):
        measurements_from_output("all_gather", zero)


@pytest.mark.skipif(not H100.exists(), reason="../shared/data not present")
def test_real_h100_profile_fits():
    p = NetworkProfile.load(H100)
    assert {op for op, _, _ in p.fits} == {"all_gather", "reduce_scatter", "all_reduce"}
    err = np.array([float(p.time(m.op, m.world_size, m.size_bytes)) * 1e6 / m.time_us - 1 for m in p.rows])
    # 8 MB..8 GB: NCCL's protocol switches near 16-64 MB are what a 2-parameter line misses
    assert np.abs(err).max() < 0.2 and np.median(np.abs(err)) < 0.03
    for n in (2, 4, 8):
        assert 250 < p.fits["all_gather", n, 1].busbw_gbs < 450  # NVLink bus bandwidth of H100 SXM
    out = subprocess.run([EXE, "cluster", "fit", str(H100)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.count(" ranks ") == 9


def test_probe_on_gloo_writes_a_profile(tmp_path):
    out = subprocess.run([EXE, "cluster", "probe", "--world-size", "2", "--sizes", "4K,64K", "--iters", "2",
                          "--warmup", "1", "--out", str(tmp_path / "p.json")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    p = NetworkProfile.load(tmp_path / "p.json")
    assert p.backend == "gloo" and len(p.rows) == 8
    assert {(op, n) for op, n, _ in p.fits} == {(op, 2) for op in ("all_gather", "reduce_scatter", "all_to_all",
                                                                 "send_recv")}
    assert all(m.time_us > 0 for m in p.rows)
    assert all(float(p.time(op, 2, 1 << 20)) > float(p.time(op, 2, 1 << 10)) for op, _, _ in p.fits)
    bad = subprocess.run([EXE, "cluster", "probe", "--sizes", "4Q"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--sizes" in bad.stderr


FAKE_LOG = """# nThread 1 nGpus 2 minBytes {lo} maxBytes {hi} step: 2(factor) warmup iters: 5 iters: 20
#  Rank  0 Group  0 Pid  100 on node01 device  0 [0x18] NVIDIA H100 80GB HBM3
#  Rank  1 Group  0 Pid  100 on node01 device  1 [0x2a] NVIDIA H100 80GB HBM3
node01:100:100 [0] NCCL INFO Bootstrap : Using eth0
#                                                              out-of-place                       in-place
#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong
     1048576        262144     float    none      -1    20.51   51.12   25.56      0    20.13   52.09   26.05      0
     2097152        524288     float    none      -1    27.80   75.44   37.72    N/A    27.44   76.43   38.21    N/A
# Avg bus bandwidth    : 31.6
"""


def test_nccl_tests_runner_with_stand_in_binaries(tmp_path):
    bin_dir = tmp_path / "build"
    bin_dir.mkdir()
    for name in ("all_gather_perf", "reduce_scatter_perf", "alltoall_perf", "sendrecv_perf"):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/{name}.args\ncat <<'EOF'\n"
                          f"{FAKE_LOG.format(lo=1048576, hi=2097152)}EOF\n")
        script.chmod(0o755)
    lines = []
    p = run_nccl_tests(bin_dir, 2, 2**20, 2**21, log_dir=tmp_path / "logs", progress=lines.append)
    assert (tmp_path / "all_gather_perf.args").read_text().split() == ["-b", "1048576", "-e", "2097152", "-f", "2",
                                                                       "-g", "2"]
    assert len(p.rows) == 8 and {m.world_size for m in p.rows} == {2}
    assert p.fits["send_recv", 2, 1].points == 2 and (tmp_path / "logs" / "alltoall_perf.log").exists()
    assert any("GB/s bus bandwidth" in line for line in lines)
    out = subprocess.run([EXE, "cluster", "nccl-tests", "--bin-dir", str(bin_dir), "--gpus", "2", "--sizes", "1M:2M",
                          "--out", str(tmp_path / "n.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert np.isclose(NetworkProfile.load(tmp_path / "n.json").rows[0].time_us, 20.51)
    missing = subprocess.run([EXE, "cluster", "nccl-tests", "--bin-dir", str(tmp_path)], capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "build_nccl_tests.sh" in missing.stderr


def test_sparse_all_to_all_pays_its_peers_latency():
    """An all-to-all a rank exchanges with few ranks of a large group: the group's bandwidth, the
    latency of those peers (torch's all_to_all_single skips empty splits); with every peer, time()."""
    import numpy as np

    from distattn.costmodel.network import default_profile

    net = default_profile()
    sizes = np.asarray([0.0, 1e3, 1e6, 1e9])
    full = net.time("all_to_all", 64, sizes)
    assert np.allclose(net.sparse_time("all_to_all", 64, sizes, 63), full)
    few = net.sparse_time("all_to_all", 64, sizes, [1, 3, 3, 3])
    alpha = {k: net.fit("all_to_all", k + 1).alpha_us * 1e-6 for k in (1, 3, 63)}
    assert few[0] == 0 and np.allclose(few[1:], full[1:] - alpha[63] + alpha[3], rtol=1e-9, atol=1e-12)
    assert few[1] < full[1] and few[3] == pytest.approx(full[3] - alpha[63] + alpha[3])
