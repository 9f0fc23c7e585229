"""One line for each user error the reliability probe of issue 68 found: the key or file named, the value cut
to 80 characters, before any rank starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from distattn.costmodel.network import profile_of
from distattn.train.config import load_config
from distattn.train.config.sections import SCHEDULERS

AUTO = ["parallel.cp=auto", "parallel.world_size=4", "parallel.scheduler=auto"]


def _bomb(path, levels: int = 9) -> None:
    """A YAML anchor bomb under a typed key: 9 ** 9 strings once expanded."""
    expr = '&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
    for i in range(1, levels):
        expr = f"&a{i} [{expr}, " + ",".join([f"*a{i - 1}"] * 8) + "]"
    path.write_text("model:\n  dim: " + expr + "\n")


def test_an_anchor_bomb_under_a_typed_key_is_one_short_line_at_once(tmp_path):
    _bomb(tmp_path / "bomb.yaml")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"^model.dim must be an int, got \[\[") as err:
        load_config(tmp_path / "bomb.yaml")
    assert time.perf_counter() - t0 < 10
    shown = str(err.value).split("got ", 1)[1].rsplit(" (list)", 1)[0]
    assert len(shown) <= 80 and "\n" not in str(err.value), str(err.value)


def test_a_long_text_value_is_cut_to_80_characters():
    with pytest.raises(ValueError, match="data.source must be one of") as err:
        load_config("tiny", ["data.source=" + "x" * 5000])
    assert len(str(err.value)) < 300


@pytest.mark.parametrize("content", [b"\x82\xff\x00garbage" * 50, b"[1, 2]", b'{"rows": [{"op": 1}]}'])
@pytest.mark.parametrize("suffix", ["", ".json", ".csv"])
def test_parallel_network_is_read_when_the_config_is(tmp_path, content, suffix):
    path = tmp_path / f"links{suffix}"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"^parallel.network: {path}"):
        load_config("tiny", [*AUTO, f"parallel.network={path}"])


def test_parallel_network_missing_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"^parallel.network: network '.*nowhere.json' is neither an existing path"):
        load_config("tiny", [*AUTO, f"parallel.network={tmp_path / 'nowhere.json'}"])


def test_a_folder_of_csvs_names_the_bad_file(tmp_path):
    (tmp_path / "good.csv").write_text("op,ngpu,nodes,dtype,size_bytes,time_us,algbw_gbs,busbw_gbs,source\n")
    (tmp_path / "bad.csv").write_bytes(b"\xd5\x00" * 100)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'bad.csv'} cannot be read as a CSV"):
        profile_of(tmp_path)


def test_simulate_network_of_random_bytes_names_the_file(tmp_path):
    path = tmp_path / "random.csv"
    path.write_bytes(bytes(range(256)) * 8)
    got = subprocess.run([sys.executable, "-m", "distattn.cli", "simulate", "--gpus", "8", "--seq-len", "32K",
                          "--network", str(path)], capture_output=True, text=True, timeout=120)
    assert got.returncode == 2 and got.stderr.strip().splitlines()[-1].startswith(
        f"distattn simulate: error: {path} "), got.stderr


def test_an_unknown_key_in_a_yaml_file_gets_the_closest_key(tmp_path):
    (tmp_path / "run.yaml").write_text("model:\n  dimm: 64\n")
    with pytest.raises(ValueError, match=r"^config .*run.yaml: unknown config key 'model.dimm'; did you mean "
                                         r"model.dim\?$"):
        load_config(tmp_path / "run.yaml")
    (tmp_path / "run.yaml").write_text("modle:\n  dim: 64\n")
    with pytest.raises(ValueError, match=r"unknown config section 'modle'; did you mean model\?"):
        load_config(tmp_path / "run.yaml")


def test_the_unknown_scheduler_error_and_the_help_list_the_same_names():
    with pytest.raises(ValueError) as err:
        load_config("tiny", ["parallel.scheduler=nope"])
    listed = str(err.value).split("choose one of ", 1)[1].split(", ")
    assert tuple(listed) == SCHEDULERS
    shown = subprocess.run([sys.executable, "-m", "distattn.cli", "train", "--help"], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "COLUMNS": "1000"}).stdout
    assert f"override parallel.scheduler ({', '.join(SCHEDULERS)})" in " ".join(shown.split())


def test_data_verify_of_a_folder_without_an_index_says_so(tmp_path, capsys):
    from distattn.cli import main

    assert main(["data", "verify", str(tmp_path)]) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{tmp_path} is a folder without an index.json") and ".bin" not in first.split(":")[0]
