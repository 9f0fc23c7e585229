"""The network profile the package ships (distattn/profiles/h100.json): it loads from the installed package
through importlib.resources, every ``--network`` takes its name as well as a path, an unknown name is an
argparse error naming the packaged profiles, and its fits are sane (NVLink faster than the network between
nodes, positive latencies). When ../shared/data/profiles/published is present, the profile agrees with the
fits it was condensed from."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest

from distattn.cli import main
from distattn.costmodel.network import (OPS, NetworkProfile, default_profile, network_source, packaged_profile,
                              packaged_profiles, profile_of)

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT.parent / "shared" / "data" / "profiles" / "published"
QUICK = ["simulate", "--gpus", "16", "--seq-len", "64K", "--json", "--draws", "1", "--schedulers", "ring", "ulysses"]


@pytest.fixture(scope="module")
def h100():
    return packaged_profile("h100")


def test_the_package_ships_h100_and_finds_it_through_importlib_resources(h100):
    import distattn

    assert "h100" in packaged_profiles()
    where = Path(network_source("h100"))
    assert where == Path(distattn.__file__).parent / "profiles" / "h100.json" and where.is_file()
    assert where.stat().st_size < 16_000   # small: fits, not the published tables
    assert NetworkProfile.load(where).rows == h100.rows == profile_of("h100").rows
    assert h100.strict and h100.gpus_per_node == 8
    assert "distattn's alpha-beta fits" in h100.source and "nccl-tests" in h100.source


def test_the_wheel_carries_the_profiles():
    """pyproject.toml's package-data names every packaged profile (else a pip install has none)."""
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["distattn"]
    for path in (ROOT / "distattn" / "profiles").glob("*.json"):
        assert any(fnmatch(f"profiles/{path.name}", pattern) for pattern in data), (path.name, data)


def test_the_fits_are_sane(h100):
    for op in OPS:
        keys = [k for k in h100.fits if k[0] == op]
        assert any(k[2] == 1 for k in keys) and any(k[2] > 1 for k in keys), op   # both scopes: strict answers all
        # NVLink (8 GPUs, one node) against the network alone (one GPU per node)
        network_only = [h100.fits[k].busbw_gbs for k in keys if k[1] == k[2] > 1]
        assert network_only and h100.fit(op, 8, 1).busbw_gbs > 3 * max(network_only), op
    for key, f in h100.fits.items():
        assert f.alpha_us > 0 and 0 < f.busbw_gbs < 1000, (key, f)
    # NVLink inside a node, the network across nodes: 8 GPUs on one node beat 8 GPUs a node over 2 or 10 nodes
    for op, n, nodes in [("all_to_all", 16, 2), ("all_to_all", 80, 10), ("send_recv", 16, 2), ("all_gather", 80, 10)]:
        assert h100.fit(op, 8, 1).busbw_gbs > h100.fit(op, n, nodes).busbw_gbs, (op, n, nodes)
    assert 200 < h100.fit("all_to_all", 8, 1).busbw_gbs < 500 and 30 < h100.fit("all_to_all", 80, 10).busbw_gbs < 60
    size = np.array([2.0**20, 2.0**30])
    assert (h100.time("all_to_all", 64, size, 8) > h100.time("all_to_all", 8, size, 1)).all()


@pytest.mark.skipif(not PUBLISHED.is_dir(), reason="../shared/data/profiles/published not present")
def test_it_agrees_with_the_published_fits_it_was_made_from(h100):
    pub = NetworkProfile.load(PUBLISHED)
    assert set(h100.fits) == set(pub.fits)
    sizes = np.array([2.0**k for k in range(14, 35, 2)])
    for key, f in pub.fits.items():
        assert h100.fits[key].alpha_us == pytest.approx(f.alpha_us, rel=0.01), key
        assert h100.fits[key].busbw_gbs == pytest.approx(f.busbw_gbs, rel=0.02), key
        # each fit is two points on its line: a capped fit (send_recv 8 GPUs / 1 node) bends a few percent off
        ratio = h100.time(key[0], key[1], sizes, key[2]) / pub.time(key[0], key[1], sizes, key[2])
        assert np.abs(ratio - 1).max() < 0.08, key


def _simulate(argv) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())


def test_simulate_takes_the_name_and_a_path_alike(tmp_path, capsys):
    by_name = _simulate(QUICK + ["--network", "h100"])
    assert {r["scheduler"] for r in by_name["results"]} == {"ring", "ulysses"}
    assert all(r["step_time_s"] > 0 for r in by_name["results"])
    copy = tmp_path / "mine.json"
    shutil.copy(network_source("h100"), copy)
    by_path = _simulate(QUICK + ["--network", str(copy)])
    drop = (lambda rows: [{k: v for k, v in r.items() if k != "planning_s"} for r in rows])   # wall-clock timed
    assert drop(by_path["results"]) == drop(by_name["results"])


def test_a_path_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default_profile().save(tmp_path / "h100")   # a file named like the packaged profile
    assert network_source("h100") == "h100"
    assert profile_of("h100").source == default_profile().source


def test_an_unknown_name_is_rc_2_naming_the_packaged_profiles(tmp_path, capsys):
    def said(err: str) -> None:
        line = err.strip().splitlines()[-1]
        assert "--network" in line and "'h999'" in line and "packaged: h100" in line and "path" in line, line

    done = subprocess.run([sys.executable, "-m", "distattn.cli", "simulate", "--gpus", "16", "--seq-len", "64K",
                           "--network", "h999"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    said(done.stderr)
    from distattn.bench import cad_balance
    from distattn.sim import cad_table, published

    for entry, argv in ((cad_table.main, []), (published.main, ["--doclens-dir", "."]), (cad_balance.main, [])):
        with pytest.raises(SystemExit) as stop:
            entry(argv + ["--network", "h999"])
        assert stop.value.code == 2, entry
        said(capsys.readouterr().err)
    with pytest.raises(ValueError, match="packaged: h100"):
        profile_of("h999")
