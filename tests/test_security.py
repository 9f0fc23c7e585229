"""Untrusted input: a checkpoint folder (its metadata pickle, its shards) and the values that reach the
Slurm script. Every attack here would create a payload file; each test asserts it was not created.
Checkpoints that cannot be read say which file is wrong and what to do."""

import inspect
import io
import os
import pickle
import shlex
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import local_slurm
from distattn.launch import LaunchOptions, sbatch_script
from ckpt_tools import reseal, save_tiny as _save, tiny_state
from distattn.train.checkpoint import dcp as checkpoint, dcp_safe
from distattn.train.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def _load(directory: Path):
    model, optimizer = tiny_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return checkpoint.load(directory, model, optimizer)


def _s(text: str) -> bytes:  # SHORT_BINUNICODE
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def _touch(path: Path) -> bytes:
    return _s(f"touch {path}")


# --- the metadata pickle -------------------------------------------------------------------------


def test_dotted_global_route_is_refused(tmp_path):
    pwned = tmp_path / "pwned.txt"
    ckpt = _save(tmp_path / "step_5")
    (ckpt / ".metadata").write_bytes(b"\x80\x04" + _s("torch.distributed.checkpoint.filesystem") + _s("os.system")
                                     + b"\x93" + _touch(pwned) + b"\x85R.")
    reseal(ckpt)
    with pytest.raises(ValueError, match=r"step_5/\.metadata is not a DCP checkpoint's metadata.*os\.system"):
        _load(ckpt)
    with pytest.raises(ValueError, match=r"\.metadata"):
        checkpoint.verify(ckpt)
    assert not pwned.exists()


def test_getattr_route_is_refused(tmp_path):
    pwned = tmp_path / "pwned.txt"
    ckpt = _save(tmp_path / "step_5")
    # getattr(<os, as a name inside filesystem>, "system")("touch ...")
    (ckpt / ".metadata").write_bytes(b"\x80\x04" + _s("builtins") + _s("getattr") + b"\x93"
                                     + _s("torch.distributed.checkpoint.filesystem") + _s("os") + b"\x93"
                                     + _s("system") + b"\x86R" + _touch(pwned) + b"\x85R.")
    reseal(ckpt)
    with pytest.raises(ValueError, match=r"\.metadata .*builtins\.getattr"):
        _load(ckpt)
    assert not pwned.exists()


def test_build_on_an_allowed_class_is_refused(tmp_path):
    """The C unpickler would setattr on the class itself (BUILD with slot state), for the whole process."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    data = (b"\x80\x04" + _s("torch.distributed.checkpoint.metadata") + _s("StorageMeta") + b"\x93"
            + b"N}" + _s("hacked") + b"\x88s\x86b.")
    with pytest.raises(ValueError, match="sets the state of a type"):
        dcp_safe._unpickle_metadata(data, tmp_path / ".metadata")
    assert not hasattr(StorageMeta, "hacked")


def test_a_real_checkpoint_still_loads(tmp_path):
    ckpt = _save(tmp_path / "step_7", step=7)
    checkpoint.verify(ckpt)
    assert _load(ckpt) == (7, [1, 2, 3])


def _fuzz_names() -> list[tuple[str, str]]:
    """Every attribute of every module the allowlist names (and of builtins/os), plain and dotted."""
    import importlib

    modules = {module for module, _ in dcp_safe._ALLOWED} | {"builtins", "os", "posix", "subprocess", "copyreg"}
    pairs = []
    for name in sorted(modules):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr in dir(module):
            pairs.append((name, attr))
            if inspect.ismodule(getattr(module, attr, None)):
                pairs += [(name, f"{attr}.{fn}") for fn in ("system", "popen", "getoutput", "run", "exec")]
        pairs += [(name, "__builtins__.exec"), (name, "os.system"), (name, "sys.modules")]
    return pairs


def test_fuzz_every_name_of_the_allowlisted_modules(tmp_path):
    pwned = tmp_path / "pwned.txt"
    as_str = _touch(pwned) + b"\x85"                                            # ("touch P",)
    as_list = b"](" + _s("touch") + _s(str(pwned)) + b"e\x85"                    # (["touch", P],)
    allowed = tuple(c for c in dcp_safe._ALLOWED.values() if isinstance(c, type))
    tried = 0
    for module, name in _fuzz_names():
        stack_global = b"\x80\x04" + _s(module) + _s(name) + b"\x93"
        text_global = b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        inst = b"(" + _touch(pwned) + b"i" + module.encode() + b"\n" + name.encode() + b"\n."
        for data in (stack_global + as_str + b"R.", stack_global + as_list + b"R.",
                     text_global + as_str + b"R.", inst):
            tried += 1
            try:
                out = dcp_safe._unpickle_metadata(data, tmp_path / ".metadata")
            except ValueError:
                continue
            assert isinstance(out, allowed), (module, name, out)  # an allowed class built from a string
    assert tried > 4000 and not pwned.exists()
    control = tmp_path / "control.txt"  # the same payload does run through a plain unpickler
    pickle.loads(b"\x80\x04" + _s("posix") + _s("system") + b"\x93" + _touch(control) + b"\x85R.")
    assert control.exists()
    # and once through the whole resume path, with a file on disk
    ckpt = _save(tmp_path / "step_5")
    (ckpt / ".metadata").write_bytes(b"\x80\x04" + _s("posix") + _s("system") + b"\x93" + as_str + b"R.")
    reseal(ckpt)
    with pytest.raises(ValueError, match="posix.system"):
        _load(ckpt)
    assert not pwned.exists()


# --- the shards ----------------------------------------------------------------------------------


def _rewrite_metadata(ckpt: Path, fqn: str, **storage) -> None:
    """Point ``fqn``'s bytes elsewhere in a metadata that is itself well formed (an attacker can write one)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    metadata = pickle.loads((ckpt / ".metadata").read_bytes())
    for index, info in metadata.storage_data.items():
        if index.fqn == fqn:
            metadata.storage_data[index] = _StorageInfo(**({"relative_path": info.relative_path,
                                                             "offset": info.offset, "length": info.length}
                                                            | storage))
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    reseal(ckpt)


class _Touch:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_non_tensor_value_in_a_shard_cannot_run_code(tmp_path):
    """DCP's own planner torch.loads optimizer param_groups with weights_only=False."""
    pwned = tmp_path / "pwned.txt"
    ckpt = _save(tmp_path / "step_5")
    blob = io.BytesIO()
    torch.save(_Touch(pwned), blob)
    shard = ckpt / "__0_0.distcp"
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(blob.getvalue())
    _rewrite_metadata(ckpt, "optim.param_groups.0.lr", offset=offset, length=len(blob.getvalue()))
    checkpoint.verify(ckpt)  # well formed: the shard is long enough
    with pytest.raises(ValueError, match=r"optim\.param_groups\.0\.lr is not plain data.*system"):
        _load(ckpt)
    assert not pwned.exists()


def test_storage_outside_the_checkpoint_is_refused(tmp_path):
    ckpt = _save(tmp_path / "step_5")
    _rewrite_metadata(ckpt, "model.weight", relative_path="../../etc/passwd")
    with pytest.raises(ValueError, match=r"places model\.weight in '\.\./\.\./etc/passwd', which is not a file"):
        checkpoint.verify(ckpt)


# --- checkpoints that cannot be read say why -----------------------------------------------------


def test_truncated_shard_is_named_with_sizes(tmp_path):
    ckpt = _save(tmp_path / "ckpt" / "step_25", step=25)
    shard = ckpt / "__0_0.distcp"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:1234])
    expected = rf"step_25/__0_0\.distcp is 1,234 bytes but the manifest says {size:,}: the file was truncated"
    with pytest.raises(ValueError, match=expected):
        checkpoint.verify(ckpt)
    with pytest.raises(ValueError, match=expected):
        _load(ckpt)
    reseal(ckpt)   # behind the manifest, the metadata still knows the shard's length
    expected = (rf"step_25/__0_0\.distcp is 1,234 bytes but the metadata needs {size:,}: the checkpoint is "
                rf"truncated; delete .*step_25 to resume from an older one")
    with pytest.raises(ValueError, match=expected):
        checkpoint.verify(ckpt)


def test_missing_or_damaged_files_are_named(tmp_path):
    ckpt = _save(tmp_path / "step_5")
    (ckpt / "__0_0.distcp").unlink()
    with pytest.raises(ValueError, match=r"__0_0\.distcp is missing: the checkpoint's manifest lists it"):
        checkpoint.verify(ckpt)
    ckpt = _save(tmp_path / "step_6")
    (ckpt / ".metadata").write_bytes((ckpt / ".metadata").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"step_6/\.metadata is 100 bytes but the manifest says"):
        checkpoint.verify(ckpt)
    reseal(ckpt)
    with pytest.raises(ValueError, match=r"step_6/\.metadata cannot be read .*damaged or truncated"):
        checkpoint.verify(ckpt)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"step_6/manifest\.json is missing"):
        checkpoint.verify(ckpt)


def test_newest_usable_skips_broken_checkpoints_and_says_so(tmp_path):
    root = tmp_path / "ckpt"
    assert checkpoint.newest_usable(root) is None
    for step in (10, 20, 25):
        _save(root / f"step_{step}", step=step)
    (root / "step_30.partial").mkdir()  # a save that never finished
    shard = root / "step_25" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1234])
    said = []
    assert checkpoint.newest_usable(root, say=said.append) == root / "step_20"
    assert len(said) == 1 and "resuming from step_20" in said[0]
    assert "step_30.partial: " in said[0] and "did not finish" in said[0] and "step_25: " in said[0] \
        and "1,234" in said[0]
    for step in (10, 20):
        shutil.rmtree(root / f"step_{step}")
    with pytest.raises(ValueError, match="no checkpoint under .* verifies: step_30.*step_25"):
        checkpoint.newest_usable(root)


# --- values that reach the Slurm script ----------------------------------------------------------

HOSTILE = "gpu\ntouch {pwned}"


def _cfg(dp: int = 1, cp: int = 2) -> RunConfig:
    return RunConfig().replace(parallel={"dp": dp, "cp": cp})


@pytest.mark.parametrize("option", ["partition", "account", "time", "log_dir", "config", "out"])
def test_control_characters_in_script_values_are_refused(tmp_path, option):
    pwned = tmp_path / "pwned5.txt"
    value = HOSTILE.format(pwned=pwned)
    flag = {"log_dir": "--log-dir", "config": "config", "out": "--out"}.get(option, f"--{option}")
    opts = LaunchOptions(**{option: value}) if option in ("partition", "account", "time", "log_dir") \
        else LaunchOptions()
    config = value if option == "config" else str(ROOT / "configs" / "tiny.yaml")
    out = value if option == "out" else None
    with pytest.raises(ValueError, match=rf"{flag} .*control character '\\n'"):
        sbatch_script(config, _cfg(), opts, out=out)
    for bad in ("a\rb", "a\x1bb", "a\x00b", "a\u2028b"):
        with pytest.raises(ValueError, match="control character"):
            sbatch_script(str(ROOT / "configs" / "tiny.yaml"), _cfg(), LaunchOptions(partition=bad))
    assert not pwned.exists()


def _odd_job(tmp_path: Path) -> tuple[Path, Path, str, Path]:
    """A config path and an out dir with spaces, quotes, $(...) and backquotes (all legal), their script."""
    pwned = tmp_path / "pwned.txt"
    odd = f"""my "odd" dir $(touch {pwned}) `touch {pwned}` 'q' ;touch {pwned}; #x"""
    config = tmp_path / odd / "cfg $(touch x).yaml"
    config.parent.mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "tiny.yaml", config)
    out = str(tmp_path / odd / "run")
    logs = tmp_path / odd / "logs"
    logs.mkdir()
    opts = LaunchOptions(partition="debug", log_dir=str(logs))
    return config, pwned, sbatch_script(str(config), _cfg(), opts, out=out), logs


def _fake_srun(tmp_path: Path) -> tuple[Path, Path]:
    """``srun`` that answers the head-node query and records the training command's argv, runs nothing."""
    fake, argv = tmp_path / "fakebin", tmp_path / "argv.bin"
    fake.mkdir()
    (fake / "srun").write_text(f"""#!/bin/bash
case " $* " in *" hostname "*) echo 127.0.0.1; exit 0;; esac
printf '%s\\0' "$@" > {shlex.quote(str(argv))}
""")
    (fake / "scontrol").write_text("#!/bin/bash\necho node1\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    return fake, argv


def _train_argv(argv: Path) -> list[str]:
    return argv.read_bytes().decode().split("\0")[:-1]


def test_odd_but_legal_values_pass_bash_and_run_nothing(tmp_path):
    config, pwned, script, _ = _odd_job(tmp_path)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    fake, argv = _fake_srun(tmp_path)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node1", SLURM_JOB_ID="7",
               SLURM_JOB_NUM_NODES="1")
    run = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    got = _train_argv(argv)
    assert got[got.index("train") + 1] == str(config.resolve())
    assert got[got.index("--out") + 1] == str(config.parent / "run")
    assert not pwned.exists() and not (tmp_path / "x").exists()


@pytest.mark.skipif(not local_slurm.available(), reason="needs root and Debian's slurmctld/slurmd "
                    "(bash scripts/setup.sh --with-slurm installs them)")
def test_odd_but_legal_values_through_a_real_sbatch(tmp_path, monkeypatch):
    """sbatch parses the #SBATCH lines itself: the log lands in the odd folder under the job's name."""
    from distattn.launch import wait_slurm_job

    config, pwned, script, logs = _odd_job(tmp_path)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    fake, argv = _fake_srun(tmp_path)
    with local_slurm.LocalSlurm(tmp_path / "slurm") as env:
        monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])  # for wait_slurm_job's scontrol
        job = subprocess.run(["sbatch", "--parsable", str(path)], env=dict(env, PATH=f"{fake}:{env['PATH']}"),
                             capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert job.returncode == 0, job.stderr
        job_id = job.stdout.strip().split(";")[0]
        state = wait_slurm_job(job_id, timeout_s=60, poll_s=0.5)
    assert state == "COMPLETED", (state, sorted(p.name for p in logs.iterdir()))
    log = logs / f"distattn-{config.stem}-{job_id}.out"
    assert log.exists() and "rendezvous at 127.0.0.1" in log.read_text()
    got = _train_argv(argv)
    assert got[got.index("train") + 1] == str(config.resolve())
    assert not pwned.exists()
