"""Mistakes a user can fix, run as a user runs them: one line on stderr naming the argument, exit
code 2, no traceback -- and found before the work whose results would be lost (measurements,
simulations), not after it."""

import subprocess
import sys
import time

import pytest

from distattn.bench.results import REQUIRED_COLUMNS, read_results

# argparse-level refusals import no torch: far under what any probe, bench or simulation takes
BEFORE_WORK_S = 5.0


def _cli(*argv, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "distattn.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout)
    return done, time.monotonic() - start


def _csv(columns, row) -> str:
    return ",".join(columns) + "\n" + ",".join(row) + "\n"


@pytest.fixture
def files(tmp_path):
    """Real files a user might pass by mistake."""
    good = {"scheduler": "ring", "mask": "causal", "dtype": "fp32", "world_size": "2", "seq_len": "256",
            "send_bytes": "1", "num_docs": "1", "heads": "8", "kv_heads": "4", "head_dim": "64", "fwd_bwd_ms": "1.0",
            "tflops": "1.0", "flops_imbalance": "1.0", "peak_mem_mb": "1.0"}
    no_seq = {k: v for k, v in good.items() if k != "seq_len"}
    paths = {"passwd": "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n",
             "no_seq_len.csv": _csv(no_seq, no_seq.values()),
             "bad_value.csv": _csv(good, dict(good, seq_len="lots").values()),
             "not_json.json": "[1, 2,\n", "a_file": "x"}
    for name, text in paths.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "binary.csv").write_bytes(bytes(range(128, 256)))
    return tmp_path


REFUSALS = {  # id: (argv given the fixture's folder, what the one line must name)
    "calibrate_not_csv": (lambda d: ["simulate", "--calibrate", d / "passwd"], ["--calibrate", "passwd", "seq_len"]),
    "calibrate_no_seq_len": (lambda d: ["simulate", "--calibrate", d / "no_seq_len.csv"],
                             ["--calibrate", "no_seq_len.csv", "missing seq_len", "expected the columns"]),
    "calibrate_bad_value": (lambda d: ["simulate", "--calibrate", d / "bad_value.csv"],
                            ["--calibrate", "bad_value.csv, line 2", "seq_len is 'lots'"]),
    "calibrate_binary": (lambda d: ["simulate", "--calibrate", d / "binary.csv"], ["--calibrate", "binary.csv"]),
    "timeline_no_folder": (lambda d: ["simulate", "--gpus", "512", "--seq-len", "512K", "--auto",
                                      "--timeline", d / "nope" / "t.csv"], ["--timeline", "does not exist"]),
    "timeline_is_folder": (lambda d: ["simulate", "--gpus", "512", "--seq-len", "512K", "--timeline", d],
                           ["--timeline", "is a folder"]),
    "doclens_not_json": (lambda d: ["simulate", "--gpus", "8", "--seq-len", "64K", "--doclens", d / "not_json.json"],
                         ["--doclens", "not_json.json", "JSON list"]),
    "probe_warmup_negative": (lambda d: ["cluster", "probe", "--warmup", "-1"], ["--warmup", "'-1'"]),
    "probe_iters_zero": (lambda d: ["cluster", "probe", "--iters", "0"], ["--iters"]),
    "probe_timeout_negative": (lambda d: ["cluster", "probe", "--timeout", "-5"], ["--timeout"]),
    "probe_one_rank": (lambda d: ["cluster", "probe", "--world-size", "1", "--out", d / "p.json"],
                       ["--world-size 1", "at least 2"]),
    "probe_out_no_folder": (lambda d: ["cluster", "probe", "--out", d / "nope" / "x.json"],
                            ["--out", "does not exist"]),
    "probe_out_is_folder": (lambda d: ["cluster", "probe", "--out", d], ["--out", "is a folder"]),
    "nccl_tests_out_no_folder": (lambda d: ["cluster", "nccl-tests", "--bin-dir", d, "--out", d / "nope" / "x.json"],
                                 ["--out", "does not exist"]),
    "nccl_tests_log_dir_under_file": (lambda d: ["cluster", "nccl-tests", "--bin-dir", d, "--log-dir",
                                                 d / "a_file" / "logs"], ["--log-dir", "is a file"]),
    "bench_out_is_file": (lambda d: ["bench", "--quick", "--out", d / "a_file"], ["--out", "is a file"]),
    "bench_out_under_file": (lambda d: ["bench", "--out", d / "a_file" / "sub" / "run"], ["--out", "is a file"]),
    "bench_world_size_zero": (lambda d: ["bench", "--quick", "--out", d / "b", "--world-sizes", "2,0"],
                              ["--world-sizes", "positive"]),
    "bench_seq_len_negative": (lambda d: ["bench", "--out", d / "b", "--seq-lens", "-256"], ["--seq-lens"]),
    "bench_unknown_mask": (lambda d: ["bench", "--quick", "--out", d / "b", "--masks", "nosuch"],
                           ["--masks", "'nosuch'"]),
}
# these import torch before they can refuse (a 1-rank probe, a mask list, a JSON sample): slower, still no work
IMPORTS_TORCH = {"probe_one_rank", "doclens_not_json", "bench_unknown_mask"}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_in_one_line_before_any_work(files, case):
    argv, names = REFUSALS[case]
    done, seconds = _cli(*argv(files))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stdout + done.stderr
    assert lines[0].startswith("distattn ") and ": error: " in lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    # nothing was measured or simulated: every command prints its header before its work starts
    assert done.stdout == "", done.stdout[-2000:]
    if case not in IMPORTS_TORCH:
        assert seconds < BEFORE_WORK_S, seconds
    assert not (files / "b").exists() and not (files / "p.json").exists()


@pytest.mark.parametrize("given", [{"world_sizes": (2,)}, {"seq_lens": (256,)}, {"repeats": 1},
                                   {"masks": ("causal",)}])
def test_quick_takes_any_explicit_value(given):
    from distattn.bench.suite import BenchConfig

    cfg = BenchConfig.quick(**given)
    (key, value), = given.items()
    assert getattr(cfg, key) == value and cfg.world_sizes == given.get("world_sizes", (2, 4))


def test_bench_quick_with_explicit_flags_runs(tmp_path):
    out = tmp_path / "new" / "bench"   # a folder that does not exist yet is made with its parents
    done, _ = _cli("bench", "--quick", "--out", out, "--world-sizes", "2", "--seq-lens", "256", "--repeats", "1",
                   "--masks", "causal", "--schedulers", "ring", "--no-peers", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world sizes [2], lengths [256], masks ['causal']" in done.stdout and "median of 1" in done.stdout
    rows = read_results(out / "results.csv")
    assert [(r["scheduler"], r["world_size"], r["seq_len"], r["mask"]) for r in rows] == [("ring", 2, 256, "causal")]
    assert set(REQUIRED_COLUMNS) <= set(rows[0])
