"""Bad input that used to reach a traceback, a hang or a wrong folder: each is now one line and exit 2,
before any rank starts (issue 31, item 7)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_yaml
from distattn.cli import main
from distattn.train.preflight import checks as preflight

SMALL = {"model": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64},
         "data": {"seq_len": 256}, "parallel": {"dp": 1, "cp": 2}, "train": {"steps": 1}}


def _config(tmp_path, **changes) -> Path:
    return small_yaml(SMALL, tmp_path, **changes)


def _refused(capfd, argv, match: str) -> None:
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and "Traceback" not in err[0], err


@pytest.mark.parametrize("args, match", [(["--kv-heads", "3"], "--kv-heads 3 must divide --heads 8"),
                                         (["--ulysses-degree", "3"], "ulysses_degree must divide the world size 4"),
                                         (["--backend", "nope"], "--backend 'nope' is unknown")])
def test_demo_refuses_before_starting_ranks(capfd, monkeypatch, args, match):
    import distattn.bench.demo

    monkeypatch.setattr(distattn.bench.demo, "run_distributed", lambda *a, **k: pytest.fail("ranks started"))
    _refused(capfd, ["demo", *args], match)


def test_out_that_cannot_be_a_folder(tmp_path, capfd):
    cfg = _config(tmp_path)
    (tmp_path / "afile").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for out, match in ((tmp_path / "afile", "is a file, not a folder"),
                       (tmp_path / "afile" / "sub", "cannot be made a folder"),
                       (tmp_path / "dangling", "which does not exist"), ("", "train.out must name a folder")):
        _refused(capfd, ["train", str(cfg), "--out", str(out)], match)
    assert (tmp_path / "afile").read_text() == "x" and not (tmp_path / "nowhere").exists()


def test_config_values_the_ranks_would_fail_on(tmp_path, capfd, monkeypatch):
    _refused(capfd, ["train", str(_config(tmp_path, train={"seed": 2**70}))], "train.seed must be below 2**32")
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    _refused(capfd, ["train", str(deep)], "nested too deeply")
    # thousands of local ranks: refused on the model states alone, without a dry plan of 4096 ranks
    monkeypatch.setattr(preflight, "rank_memory_bytes", lambda cfg: pytest.fail("planned 4096 ranks"))
    _refused(capfd, ["train", str(_config(tmp_path, parallel={"cp": 4096}))], "for 4096 rank(s) but this machine")


def test_cluster_inputs(tmp_path, capfd):
    log = tmp_path / "nccl.log"
    log.write_text("#       size         count      type   redop    root     time   algbw   busbw #wrong\n"
                   f"     {'9' * 4000}        262144     float     sum      -1    20.51   51.12   44.73      0\n")
    _refused(capfd, ["cluster", "nccl-parse", str(log)], "4000 digits long")
    row = {"op": 5, "world_size": 8, "size_bytes": 1 << 20, "time_us": 12.5}
    profile = {"source": "x", "gpus_per_node": 8, "inter_node": {"alpha_us": 20.0, "busbw_gbs": 45.0}, "rows": [row]}
    bad_op = tmp_path / "op.json"
    bad_op.write_text(json.dumps(profile))
    _refused(capfd, ["cluster", "fit", str(bad_op)], "a collective is named by a string")
    for busbw in (0, -45):
        path = tmp_path / f"bw{busbw}.json"
        path.write_text(json.dumps({**profile, "rows": [{**row, "op": "all_gather"}],
                                    "inter_node": {"alpha_us": 20.0, "busbw_gbs": busbw}}))
        _refused(capfd, ["simulate", "--gpus", "16", "--seq-len", "64K", "--network", str(path)],
                 "inter_node.busbw_gbs must be a finite number > 0")


def test_help_imports_neither_torch_nor_numpy():
    code = ("import sys\nfrom distattn.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr.strip() == "[]", out.stderr


def test_a_tokenizer_folder_with_its_own_code_is_refused_unrun(tmp_path, capfd):
    pytest.importorskip("transformers")
    folder, marker = tmp_path / "tok", tmp_path / "PWNED"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    _refused(capfd, ["data", "prepare", str(corpus), "--out", str(tmp_path / "out"), "--tokenizer", str(folder)],
             "names its own Python code")
    assert not marker.exists()


@pytest.mark.parametrize("scale", [0, -1.0, float("nan"), float("inf"), True])
def test_a_scale_that_is_not_a_positive_finite_float_is_refused(scale):
    """``scale=0`` or a negative scale gave NaN in most outputs on the CPU backend, silently."""
    import distattn

    q, k = torch.randn(16, 2, 8), torch.randn(16, 1, 8)
    plan = distattn.plan([7, 9], 1)
    for call in (lambda: distattn.attention(q, k, k, plan, scale=scale),
                 lambda: distattn.local_attention(q, k, k, [7, 9], scale=scale),
                 lambda: distattn.reference_attention(q, k, k, [7, 9], scale=scale)):
        with pytest.raises(ValueError, match="scale must be a positive finite float"):
            call()
    assert torch.isfinite(distattn.local_attention(q, k, k, [7, 9], scale=np.float32(0.5))).all()   # numbers pass


def test_a_head_dim_of_zero_is_refused():
    import distattn

    empty = torch.randn(16, 2, 0)
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        distattn.local_attention(empty, empty, empty, [16])


@pytest.mark.parametrize("flag", ["--doclens", "--network"])
def test_simulate_refuses_deeply_nested_json_in_one_line(tmp_path, capfd, flag):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    _refused(capfd, ["simulate", "--gpus", "16", "--seq-len", "64K", flag, str(path)], "nested too deeply")


@pytest.mark.parametrize("args, match", [(["--gpus", "16", "--seq-len", "1e12"], "at most 1,073,741,824 (1G) tokens"),
                                         (["--gpus", "10000000", "--seq-len", "64K"], "at most 1,048,576 GPUs"),
                                         (["--gpus", "16", "--seq-len", "64K", "--draws", "100000"],
                                          "at most 4,096 draws")])
def test_simulate_sizes_are_bounded(capfd, args, match):
    """``--seq-len 1e12`` ran on with no bound and no message."""
    with pytest.raises(SystemExit) as stopped:
        main(["simulate", *args])
    err = capfd.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and match in err[0], err
