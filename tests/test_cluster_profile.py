"""Network profiles: alpha-beta fits (synthetic and the real H100 profile), `distattn cluster probe` on gloo,
and the nccl-tests runner driven through stand-in binaries that print real-looking output."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distattn.cluster.nccl_tests import run_nccl_tests
from distattn.cluster.profile import Measurement, NetworkProfile, bus_factor, default_profile, fit_alpha_beta

EXE = str(Path(sys.executable).with_name("distattn"))
H100 = Path(__file__).resolve().parents[2] / "shared" / "data" / "profiles" / "nccl_perf_h100.csv"


def test_fit_recovers_alpha_and_bus_bandwidth():
    sizes = [2**k for k in range(12, 28)]
    for op, n in (("all_gather", 8), ("send_recv", 2), ("all_reduce", 4)):
        times = [30.0 + bus_factor(op, n) * s / 200e3 for s in sizes]  # 30 us + 200 GB/s
        f = fit_alpha_beta(op, n, sizes, times)
        assert f.alpha_us == pytest.approx(30.0, rel=1e-6) and f.busbw_gbs == pytest.approx(200.0, rel=1e-6)


def test_extrapolation_and_inter_node_cap():
    p = NetworkProfile(tuple(Measurement("all_gather", n, s, 10.0 * (n - 1) + 0.875 * s / 300e3)
                             for n in (2, 8) for s in (2**20, 2**26)), gpus_per_node=8)
    assert set(p.fits) == {("all_gather", 2), ("all_gather", 8)}
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


@pytest.mark.skipif(not H100.exists(), reason="../shared/data not present")
def test_real_h100_profile_fits():
    p = NetworkProfile.load(H100)
    assert {op for op, _ in p.fits} == {"all_gather", "reduce_scatter", "all_reduce"}
    err = np.array([float(p.time(m.op, m.world_size, m.size_bytes)) * 1e6 / m.time_us - 1 for m in p.rows])
    # 8 MB..8 GB: NCCL's protocol switches near 16-64 MB are what a 2-parameter line misses
    assert np.abs(err).max() < 0.2 and np.median(np.abs(err)) < 0.03
    for n in (2, 4, 8):
        assert 250 < p.fits["all_gather", n].busbw_gbs < 450  # NVLink bus bandwidth of H100 SXM
    out = subprocess.run([EXE, "cluster", "fit", str(H100)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.count(" ranks ") == 9


def test_probe_on_gloo_writes_a_profile(tmp_path):
    out = subprocess.run([EXE, "cluster", "probe", "--world-size", "2", "--sizes", "4K,64K", "--iters", "2",
                          "--warmup", "1", "--out", str(tmp_path / "p.json")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    p = NetworkProfile.load(tmp_path / "p.json")
    assert p.backend == "gloo" and len(p.rows) == 8
    assert {(op, n) for op, n in p.fits} == {(op, 2) for op in ("all_gather", "reduce_scatter", "all_to_all",
                                                                 "send_recv")}
    assert all(m.time_us > 0 for m in p.rows)
    assert all(float(p.time(op, 2, 1 << 20)) > float(p.time(op, 2, 1 << 10)) for op, _ in p.fits)
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
    assert p.fits["send_recv", 2].points == 2 and (tmp_path / "logs" / "alltoall_perf.log").exists()
    assert any("GB/s bus bandwidth" in line for line in lines)
    out = subprocess.run([EXE, "cluster", "nccl-tests", "--bin-dir", str(bin_dir), "--gpus", "2", "--sizes", "1M:2M",
                          "--out", str(tmp_path / "n.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert np.isclose(NetworkProfile.load(tmp_path / "n.json").rows[0].time_us, 20.51)
    missing = subprocess.run([EXE, "cluster", "nccl-tests", "--bin-dir", str(tmp_path)], capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "build_nccl_tests.sh" in missing.stderr
