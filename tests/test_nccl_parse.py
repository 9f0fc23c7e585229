"""nccl-tests output parsing: both column layouts, mpirun prefixes, interleaved NCCL lines, a missing
in-place group, N/A counts; bad files name the line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distattn.cluster.nccl import parse_nccl_tests, parse_nccl_tests_file

NEW = """# nThread 1 nGpus 8 minBytes 1048576 maxBytes 4194304 step: 2(factor) warmup iters: 5 iters: 20 agg iters: 1 validation: 1 graph: 0
#
# Using devices
#  Rank  0 Group  0 Pid  41234 on    node01 device  0 [0x18] NVIDIA H100 80GB HBM3
#  Rank  1 Group  0 Pid  41234 on    node01 device  1 [0x2a] NVIDIA H100 80GB HBM3
node01:41234:41234 [0] NCCL INFO Bootstrap : Using eth0:10.1.0.1<0>
#
#                                                              out-of-place                       in-place
#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)            (us)  (GB/s)  (GB/s)
     1048576        262144     float    none      -1    20.51   51.12   44.73      0    20.13   52.09   45.58      0
node01:41234:41250 [3] NCCL INFO Channel 02/0 : 3[3] -> 4[4] via P2P/IPC/read
     2097152        524288     float    none      -1    27.80   75.44   66.01      0    27.44   76.43   66.87      0
     4194304       1048576     float    none      -1    40.02  104.80   91.70    N/A    39.61  105.89   92.65    N/A
# Out of bounds values : 0 OK
# Avg bus bandwidth    : 67.5893
#
"""

OLD_MPIRUN = """[1,0]<stdout>:# nThread 1 nGpus 1 minBytes 8 maxBytes 64 step: 2(factor) warmup iters: 5 iters: 20 validation: 1
[1,0]<stdout>:#
[1,0]<stdout>:#                                                     out-of-place                       in-place
[1,0]<stdout>:#       size         count    type   redop     time   algbw   busbw  error     time   algbw   busbw  error
[1,0]<stdout>:#        (B)    (elements)                     (us)  (GB/s)  (GB/s)            (us)  (GB/s)  (GB/s)
[1,0]<stdout>:           8             2   float     sum    29.13    0.00    0.00  0e+00    28.80    0.00    0.00  0e+00
[1,0]<stdout>:          16             4   float     sum    28.95    0.00    0.00  0e+00    28.71    0.00    0.00  0e+00
[1,1]<stderr>:node02:5555:5555 [0] NCCL INFO comm 0x55 rank 1 nranks 16 cudaDev 0 busId 18000 - Init COMPLETE
[1,0]<stdout>:          32             8   float     sum    29.40    0.00    0.00  0e+00    29.22    0.00    0.00  0e+00
[1,0]<stdout>:          64            16   float     sum    29.77    0.00    0.00  0e+00    29.50    0.00    0.00  0e+00
"""

OUT_OF_PLACE_ONLY = """#
#                                                              out-of-place
#       size         count      type   redop    root     time   algbw   busbw #wrong
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)
     8388608       2097152      half    none      -1    35.54  236.06  118.03      0
    16777216       4194304      half    none      -1    48.39  346.74  173.37      0
"""


def test_new_layout_with_interleaved_info_and_na():
    out = parse_nccl_tests(NEW)
    assert [r["size"] for r in out["rows"]] == [1048576, 2097152, 4194304]
    first = out["rows"][0]
    assert (first["type"], first["redop"], first["root"]) == ("float", "none", -1)
    assert (first["time_us"], first["algbw"], first["busbw"], first["wrong"]) == (20.51, 51.12, 44.73, 0)
    assert first["in_place"] == {"time_us": 20.13, "algbw": 52.09, "busbw": 45.58, "wrong": 0}
    assert out["rows"][2]["wrong"] is None and out["rows"][2]["in_place"]["wrong"] is None
    assert out["avg_busbw"] == pytest.approx(67.5893)


def test_old_layout_with_mpirun_prefixes_and_no_trailer():
    out = parse_nccl_tests(OLD_MPIRUN)
    assert [r["count"] for r in out["rows"]] == [2, 4, 8, 16]
    assert out["rows"][0]["root"] is None and out["rows"][0]["redop"] == "sum"
    assert out["rows"][0]["wrong"] == 0.0 and out["rows"][3]["in_place"]["time_us"] == 29.50
    assert out["avg_busbw"] == 0.0  # no trailer: the mean of the out-of-place busbw


def test_missing_in_place_group():
    out = parse_nccl_tests(OUT_OF_PLACE_ONLY)
    assert out["rows"][1]["busbw"] == 173.37 and out["rows"][1]["in_place"] is None
    assert out["avg_busbw"] == pytest.approx((118.03 + 173.37) / 2)


def test_bad_files_name_the_line(tmp_path):
    broken = NEW.replace("2097152        524288     float    none      -1    27.80",
                         "2097152        524288     float    none      -1    27.80   99")
    with pytest.raises(ValueError, match="line 13: 14 fields but the header has 13 columns"):
        parse_nccl_tests(broken)
    with pytest.raises(ValueError, match="line 11: time is 'fast', not a number"):
        parse_nccl_tests(NEW.replace("20.51", "fast"))
    path = tmp_path / "empty.log"
    path.write_text("nothing to see\n")
    with pytest.raises(ValueError, match="empty.log: no nccl-tests header line"):
        parse_nccl_tests_file(path)


def test_cli_prints_json(tmp_path):
    path = tmp_path / "ag.log"
    path.write_text(NEW)
    exe = Path(sys.executable).with_name("distattn")
    out = subprocess.run([str(exe), "cluster", "nccl-parse", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["rows"]) == 3 and data["avg_busbw"] == pytest.approx(67.5893)
    bad = tmp_path / "bad.log"
    bad.write_text("# size count type time algbw busbw\n 8 2 float x 1 1\n")
    out = subprocess.run([str(exe), "cluster", "nccl-parse", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "line 2: time is 'x'" in out.stderr
