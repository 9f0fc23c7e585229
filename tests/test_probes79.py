"""Issue 79's probes: the right words for a Ulysses mesh with too few heads, a CSV with a BOM, bad
explicit layouts, a held rendezvous port, and upper bounds on every int a config or doclens file gives."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import distattn
from distattn.planning.doclens import load_doc_lens
from distattn.costmodel.network_csv import load_csv, read_nccl_perf_csv, read_published_csv
from distattn.train.config import RunConfig, validate

ROOT = Path(__file__).resolve().parents[1]
HUGE = 10**100


@pytest.mark.parametrize("section,key", [("model", "dim"), ("data", "seq_len"), ("train", "steps")])
def test_huge_ints_are_refused_naming_key_value_and_bound(section, key):
    with pytest.raises(ValueError, match=rf"^{section}\.{key} must be at most [\d,]+ \(.*\), got 1000"):
        validate(RunConfig().replace(**{section: {key: HUGE}}))
    with pytest.raises(ValueError, match=rf"{section}\.{key} must be an int, got True \(bool\)"):
        validate(RunConfig().replace(**{section: {key: True}}))


def test_ints_each_in_bounds_are_refused_when_their_product_overflows():
    # each key below its own bound, the run's tokens (steps x ranks x seq_len = 2**73) past int64
    cfg = RunConfig().replace(train={"steps": 2**40}, data={"seq_len": 2**31}, model={"dim": 64, "n_layers": 1})
    with pytest.raises(ValueError, match=r"train.steps x the tokens a step trains .* is 9.44e\+21, more than"):
        validate(cfg)
    validate(RunConfig().replace(train={"steps": 2**39}))   # a trillion-step bound, not a small one


def test_keep_last_and_profile_steps():
    assert validate(RunConfig().replace(train={"keep_last": 2, "profile_steps": [3, 3]})).train.profile_steps == (3, 3)
    # a resumed run may profile past the first run's train.steps
    validate(RunConfig().replace(train={"steps": 5, "profile_steps": (10, 12)}))
    for train, match in (({"keep_last": 0}, "train.keep_last must be >= 1"),
                         ({"keep_last": True}, r"train.keep_last must be an int, got True"),
                         ({"profile_steps": [3, 2]}, r"1 <= start <= end .* got \[3, 2\]"),
                         ({"profile_steps": [0, 2]}, r"1 <= start <= end .* got \[0, 2\]"),
                         ({"profile_steps": [True, 2]}, r"train.profile_steps\[0\] must be an int, got True"),
                         ({"profile_steps": [1]}, r"train.profile_steps must be a list \[int, int\]"),
                         ({"profile_steps": [1, HUGE]}, "train.profile_steps must be steps at most")):
        with pytest.raises(ValueError, match=match):
            validate(RunConfig().replace(train=train))


def test_print_config_refuses_a_huge_dim_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "distattn.cli", "train", "configs/tiny.yaml", f"model.dim={HUGE}",
                           "--print-config"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "model.dim must be at most 16,777,216" in proc.stderr and "Traceback" not in proc.stderr


def test_ulysses_with_fewer_heads_than_ranks_names_the_heads():
    ulysses = RunConfig().replace(parallel={"scheduler": "ulysses", "cp": 16})   # model.n_heads 8
    heads = r"^8 query heads \(model.n_heads\) < parallel.cp 16: Ulysses needs at least one head per rank; use " \
            r"parallel.scheduler: usp with parallel.ulysses_degree <= 8, or parallel.cp <= 8$"
    with pytest.raises(ValueError, match=heads):
        validate(ulysses)
    with pytest.raises(ValueError, match=heads):   # the heads first, not the head_groups bound they imply
        validate(ulysses.replace(parallel={"head_groups": 2}))
    validate(ulysses.replace(parallel={"cp": 3}))   # uneven heads over 3 ranks: runs
    with pytest.raises(ValueError, match=r"head_groups \(2\) must be at most the query heads .* \(1 of"):
        validate(ulysses.replace(parallel={"cp": 8, "head_groups": 2}))


PUBLISHED = "op,ngpu,nodes,dtype,size_bytes,time_us,algbw_gbs,busbw_gbs,source\nalltoall,8,1,float,1024,5.0,,,x\n"


def test_csv_tables_saved_with_a_bom_are_read(tmp_path):
    published, nccl = tmp_path / "published.csv", tmp_path / "nccl.csv"
    published.write_bytes(b"\xef\xbb\xbf" + PUBLISHED.encode())   # what Excel's "CSV UTF-8" saves
    nccl.write_bytes(b"\xef\xbb\xbfop,ngpu,size_bytes,t_us_out\nalltoall,8,1024,5.0\n")
    (row,) = read_published_csv(published)
    assert (row.op, row.world_size, row.size_bytes, row.time_us) == ("all_to_all", 8, 1024, 5.0)
    assert len(load_csv(published)[0]) == 1
    (row,) = read_nccl_perf_csv(nccl)
    assert (row.world_size, row.time_us) == (8, 5.0)
    lens = tmp_path / "lens.json"
    lens.write_bytes(b"\xef\xbb\xbf[3, 4]")
    assert load_doc_lens(lens).tolist() == [3, 4]


@pytest.mark.parametrize("entry,match", [
    ([5, -1], "element 1 is -1, a negative token index"),
    (None, r"it is None \(NoneType\)"),
    ([0, None], r"element 1 is None \(NoneType\)"),
    ([0, 1.0], r"element 1 is 1.0 \(float\)"),
    ([True, 1], r"element 0 is True \(bool\)"),
    (["0"], r"element 0 is '0' \(str\)"),
    ([0, [1, 2]], r"element 1 is \[1, 2\] \(list\)"),
    ({0: 1}, r"it is \{0: 1\} \(dict\)"),
    ([2**70], "past int64"),
])
def test_bad_layout_entries_are_value_errors(entry, match):
    with pytest.raises(ValueError, match=rf"Layout.from_indices: rank 1's entry .*{match}"):
        distattn.Layout.from_indices([[2, 3, 4], entry])


def test_a_negative_index_in_a_long_layout_is_reported_as_negative():
    import numpy as np

    idx = np.arange(1 << 16)
    with pytest.raises(ValueError, match=r"rank 1's .* element 32767 is -5, a negative"):
        distattn.Layout.from_indices([idx[:32768].tolist(), [*idx[32768:-1].tolist(), -5]])
    # a token held twice (past the per-entry checks) is found without a loop over runs
    twice = [idx[0::2].tolist(), idx[1::2].tolist()[:-1] + [0]]
    with pytest.raises(ValueError, match="token 0 is held twice"):
        distattn.Layout.from_indices(twice).shards([1 << 16], 2)


def test_a_held_rendezvous_port_is_refused_in_one_line(capsys):
    from distattn.launch.torchrun import check_rendezvous_port, main

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        one_node = ["--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=distattn-c10d",
                    f"--rdzv-endpoint=127.0.0.1:{port}", "--local-addr=127.0.0.1", "-m", "distattn.cli", "train", "x"]
        with pytest.raises(ValueError, match=rf"rendezvous port {port} on 127.0.0.1 is already held .* "
                                             rf"`distattn launch --port PORT`"):
            check_rendezvous_port(one_node)
        # several nodes: the first hosts the store, this one may be its client
        check_rendezvous_port(["--nnodes=2", *one_node[1:]])
        with pytest.raises(SystemExit) as stop:   # before torchrun starts any rank
            main(one_node)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"port {port}" in err and "--port" in err
    check_rendezvous_port(one_node)   # free again: no refusal


def test_doclens_files_refuse_huge_and_boolean_lengths(tmp_path):
    for i, (values, entry) in enumerate((("[5, 1e23]", "entry 1 is 1e\\+23"), ("[true, 200]", "entry 0 is true"),
                                         (json.dumps([7, 10**23]), f"entry 1 is {10**23}"))):
        path = tmp_path / f"lens{i}.json"
        path.write_text(values)
        with pytest.raises(ValueError, match=rf"lens{i}.json: {entry}; document lengths are ints from 1 to"):
            load_doc_lens(path)


def test_plan_refuses_a_document_length_past_int64_sums():
    from distattn.planning.masks import as_doc_lens   # what distattn.plan checks its doc_lens with

    with pytest.raises(ValueError, match=r"doc_lens\[1\] = 2199023255552: document lengths must be at most 2\*\*40"):
        as_doc_lens([8, 2**41])
    with pytest.raises(ValueError, match=r"doc_lens\[0\] = True is not an int"):
        as_doc_lens([True, 200])


def test_int_flags_have_an_upper_bound():
    import argparse

    from distattn.cli._args import positive_int, positive_int_list

    assert positive_int(str(2**40)) == 2**40 and positive_int_list("2,4") == [2, 4]
    for parse, text in ((positive_int, str(HUGE)), (positive_int_list, f"2,{2**41}")):
        with pytest.raises(argparse.ArgumentTypeError, match=r"of at most 1,099,511,627,776 \(2\*\*40\)"):
            parse(text)
