"""``distattn ckpt verify``: check checkpoints offline, the way a resume checks them."""

from __future__ import annotations

import sys
from pathlib import Path

from ._args import command_group, examples


def _cmd_verify(args) -> int:
    from ..train.checkpoint import dcp as checkpoint, manifest
    from ..train.checkpoint.resume import geometry_words, recorded_model_problem
    from ..train.safe_io import lock_held, one_line

    path = Path(args.dir)
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder: pass a checkpoint (OUT/ckpt/step_N) or a folder of them "
                         f"(OUT/ckpt)")
    # OUT/.lock held: a run is writing into OUT now, so its step_N.partial is not abandoned
    if path.name.endswith(checkpoint.PARTIAL):
        live = lock_held(path.parent.parent / ".lock")
        print(f"skip {path.parent / checkpoint.unfinished(path.name, live)}")
        return 0 if live else 1
    if (path / manifest.NAME).exists() or (path / ".metadata").exists():
        targets = [path]
    else:
        found, unfinished = checkpoint.candidates(path, live=lock_held(path.parent / ".lock"))
        for line in unfinished:
            print(f"skip {path / line}")
        if not found:
            raise ValueError(f"{path} holds no checkpoint (step_N folders); pass OUT/ckpt or OUT/ckpt/step_N")
        targets = found
    bad = 0
    for target in targets:
        try:
            found_manifest = checkpoint.verify(target)
            if problem := recorded_model_problem(found_manifest):   # (as a resume refuses it)
                raise ValueError(f"no run can resume it: {problem}")
        except (ValueError, OSError) as exc:
            bad += 1
            print(f"FAIL {target}: {one_line(exc)}")
            continue
        geometry = found_manifest.run.get("geometry")   # (what a resume must keep: --allow-reshape)
        trained = f"; trained with {geometry_words(geometry)}" if geometry else ""
        print(f"ok   {target}: step {found_manifest.step}, {len(found_manifest.files)} files, "
              f"{found_manifest.total_bytes / 2**20:,.1f} MiB, every checksum matches{trained}")
    if bad:
        print(f"distattn ckpt verify: {bad} of {len(targets)} checkpoint(s) failed; a resume skips them and uses "
              f"the newest that verifies", file=sys.stderr)
        return 1
    return 0


def add_parsers(sub) -> None:
    ckpt_sub = command_group(
        sub, "ckpt", help="check training checkpoints offline",
        description="Work with the checkpoints `distattn train` writes (OUT/ckpt/step_N).",
        epilog=examples(".venv/bin/distattn ckpt verify runs/tiny/ckpt",
                        ".venv/bin/distattn ckpt verify runs/tiny/ckpt/step_50"))
    verify = ckpt_sub.add_parser(
        "verify", help="check every file of a checkpoint against its manifest (sizes, SHA-256, metadata)",
        description="Check a checkpoint, or each checkpoint in a folder, as a resume does: exactly the files its "
                    "manifest.json lists, each of the listed size and SHA-256, and DCP metadata that reads safely. "
                    "Prints one line per checkpoint; exit 0 when all verify, 1 when any fails.",
        epilog=examples(".venv/bin/distattn ckpt verify runs/tiny/ckpt",
                        ".venv/bin/distattn ckpt verify runs/tiny/ckpt/step_50"))
    verify.add_argument("dir", metavar="DIR", help="OUT/ckpt (every step_N in it) or one OUT/ckpt/step_N")
    verify.set_defaults(func=_cmd_verify)
