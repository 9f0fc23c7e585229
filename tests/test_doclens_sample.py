"""The document-length sample shipped in the package (``--doclens sample``): what its generator writes."""

import json
import subprocess
import sys

import numpy as np
import pytest

from distattn.planning.doclens import doclens_source, load_doc_lens, synthetic_sample


def test_the_packaged_sample_is_its_generators_output():
    shipped = json.loads(open(doclens_source("sample")).read())
    assert shipped == synthetic_sample()
    lens = load_doc_lens("sample")
    assert len(lens) == 4000 and 1500 < np.median(lens) < 2500 and (lens > 65536).sum() > 50


def test_a_path_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample").write_text("[5, 6]")
    assert list(load_doc_lens("sample")) == [5, 6]


def test_neither_a_file_nor_a_name_is_one_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"nope.json is neither an existing file nor a packaged sample \(sample\)"):
        load_doc_lens(tmp_path / "nope.json")


def test_simulate_takes_the_sample_by_name():
    got = subprocess.run([sys.executable, "-m", "distattn.cli", "simulate", "--gpus", "8", "--seq-len", "32K",
                          "--doclens", "sample", "--draws", "2", "--schedulers", "ulysses"],
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0 and "documents: sample" in got.stdout, got.stdout + got.stderr
