"""nccl-tests output parsing: both column layouts, mpirun prefixes, interleaved NCCL lines, a missing
in-place group, N/A figures; bad files (negative or non-finite figures included) name the line; logs
of any size are streamed without torch."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from distattn.cluster.nccl import parse_nccl_tests, parse_nccl_tests_file, write_nccl_json

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


def _strict(name):
    raise ValueError(f"{name} is not JSON")


def _head(text: str, lines: int) -> str:
    return "".join(text.splitlines(keepends=True)[:lines])


def test_na_bus_bandwidth_without_trailer():
    # the mean is over the rows that have a bus bandwidth; none at all gives null, not a TypeError
    out = parse_nccl_tests(OUT_OF_PLACE_ONLY.replace("118.03", "   N/A"))
    assert out["rows"][0]["busbw"] is None and out["avg_busbw"] == pytest.approx(173.37)
    all_na = _head(OUT_OF_PLACE_ONLY, 4) + "  8388608  2097152  half  none  -1  N/A  N/A  N/A  N/A\n"
    out = parse_nccl_tests(all_na)
    assert out["avg_busbw"] is None and out["rows"][0]["time_us"] is None and out["rows"][0]["wrong"] is None
    assert json.loads(json.dumps(out, allow_nan=False))["avg_busbw"] is None


@pytest.mark.parametrize("old, new, what", [("20.51", "-20.51", "time"), ("51.12", "-51.12", "algbw"),
                                            ("44.73", "-44.73", "busbw"), ("45.58", "-45.58", "busbw"),
                                            ("     1048576", "    -1048576", "size"),
                                            ("262144", "-262144", "count")])
def test_negative_figures_name_the_line(old, new, what):
    with pytest.raises(ValueError, match=f"line 11: {what} is '{new.strip()}'; it cannot be negative"):
        parse_nccl_tests(NEW.replace(old, new, 1))
    with pytest.raises(ValueError, match="line 16: Avg bus bandwidth is '-67.5893'"):
        parse_nccl_tests(NEW.replace(": 67.5893", ": -67.5893"))
    assert parse_nccl_tests(NEW)["rows"][0]["root"] == -1  # root -1 is nccl-tests' "no root", not an error


@pytest.mark.parametrize("token, why", [("1e999", "not a finite number"), ("-1e999", "not a finite number"),
                                        ("inf", "not a number"), ("nan", "not a number"),
                                        ("Infinity", "not a number")])
def test_non_finite_figures_name_the_line(token, why):
    with pytest.raises(ValueError, match=f"line 11: busbw is '{token}', {why}"):
        parse_nccl_tests(NEW.replace("44.73", token))
    with pytest.raises(ValueError, match=f"line 16: Avg bus bandwidth is '{token}', {why}"):
        parse_nccl_tests(NEW.replace("67.5893", token))


def test_output_is_strict_json(tmp_path):
    # two huge but finite bus bandwidths: their sum overflows to inf, their mean does not
    huge = OUT_OF_PLACE_ONLY.replace("118.03", "1.7e308").replace("173.37", "1.7e308")
    assert parse_nccl_tests(huge)["avg_busbw"] == pytest.approx(1.7e308)
    path = tmp_path / "huge.log"
    path.write_text(huge)
    buf = io.StringIO()
    write_nccl_json(path, buf)
    assert json.loads(buf.getvalue(), parse_constant=_strict) == parse_nccl_tests_file(path)
    exe = Path(sys.executable).with_name("distattn")
    out = subprocess.run([str(exe), "cluster", "nccl-parse", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout, parse_constant=_strict)["avg_busbw"] == pytest.approx(1.7e308)


def test_parser_imports_neither_torch_nor_numpy():
    code = ("import sys, distattn.cluster.nccl\nprint(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
            "import distattn.costmodel.network\nprint(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "['numpy']"]  # profiles need numpy, never torch


ROW = "     1048576        262144     float    none      -1    20.51   51.12   44.73      0    20.13   52.09   45.58" \
      "      0\n"
INFO = "node01:41234:41250 [3] NCCL INFO Channel 02/0 : 3[3] -> 4[4] via P2P/IPC/read\n"
# VmHWM, not getrusage: ru_maxrss survives exec, so a child forked from a large pytest reports pytest's peak
PEAK = ("print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0], "
        "'torch' in sys.modules)")
RUNNERS = {
    "library": "import sys\nfrom distattn.cluster.nccl import write_nccl_json\n"
               "with open(sys.argv[2], 'w') as out:\n    write_nccl_json(sys.argv[1], out)\n",
    "cli": "import sys, contextlib\nfrom distattn.cli import main\n"
           "with open(sys.argv[2], 'w') as out, contextlib.redirect_stdout(out):\n"
           "    assert main(['cluster', 'nccl-parse', sys.argv[1]]) == 0\n",
}


@pytest.fixture(scope="module")
def big_log(tmp_path_factory):
    """~12 MB: 60,000 result rows between NCCL INFO lines (the unstreamed parser peaked at ~235 MB)."""
    path = tmp_path_factory.mktemp("big") / "big.log"
    path.write_text(NEW.split("\n     1048576")[0] + "\n" + (ROW + INFO) * 60000 + "# Avg bus bandwidth    : 44.73\n")
    return path


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from /proc")
@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_large_logs_are_streamed(big_log, runner, tmp_path):
    out_path = tmp_path / "out.json"
    done = subprocess.run([sys.executable, "-c", RUNNERS[runner] + PEAK, str(big_log), str(out_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_kb, torch_loaded = done.stdout.split()
    assert int(peak_kb) < 100 * 1024, f"peak RSS {int(peak_kb) / 1024:.0f} MB parsing a 12 MB log"
    assert torch_loaded == "False"
    data = json.loads(out_path.read_text(), parse_constant=_strict)
    assert len(data["rows"]) == 60000 and data["avg_busbw"] == 44.73 and data["rows"][-1]["in_place"]["busbw"] == 45.58
