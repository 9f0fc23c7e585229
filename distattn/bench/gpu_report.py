"""One command for the GPU report: ``bash scripts/gpu_report.sh [REPORT.md]`` (this module's ``main``).

On a machine with an NVIDIA GPU it runs, and writes to one Markdown file with every figure:

1. the GPU suite, ``tests/test_gpu.py`` (pytest-xdist's 4 workers where it is installed: the suite's
   time is mostly Triton compiling and autotuning, which the workers do side by side);
2. the kernel benchmark, ``python -m distattn.kernels.bench`` (TFLOP/s of triton, PyTorch's
   FlashAttention and SDPA at 1K, 8K and 32K tokens per sequence, head dims 64 and 128);
3. a short training run on one GPU under torchrun with each attention backend (``triton``, ``torch``),
   with ``triton`` and every block compiled (``train.compile``), and with ``triton`` and
   ``train.deterministic`` (what bitwise-equal reruns cost): tokens/s, MFU, peak memory and loss per
   step, the first steps (compilation, autotuning) left out of the means.

Without a GPU it writes a report that says so and exits 0. Exit code 1 when a part failed (the report
still lists the rest).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = """model: {{dim: 2048, n_layers: 4, n_heads: 16, n_kv_heads: 4, ffn_dim: 5632, vocab_size: 32000}}
data: {{source: stdlib, seq_len: {seq_len}, seed: 0}}
parallel: {{dp: 1, cp: 1, backend: {backend}}}
train: {{steps: {steps}, dtype: bf16, activation_checkpointing: full, warmup_steps: 2, log_every: 1,
         ckpt_every: 1000, out: {out}, compile: {compile}, deterministic: {deterministic}}}
"""
WARMUP_STEPS = 3   # compilation and autotuning: left out of the means


def _run(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout + done.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out + f"\n(stopped after {timeout:.0f} s)", time.perf_counter() - t0


def _environment() -> list[str]:
    import torch

    lines = [f"- GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}, "
             f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), {torch.cuda.device_count()} visible"]
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip().splitlines()
    lines.append(f"- driver {smi[0] if smi else '?'}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
                 f"triton {triton_version}, Python {platform.python_version()}")
    return lines


def _suite(tmp: Path) -> tuple[bool, list[str]]:
    xml = tmp / "suite.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    try:
        import xdist  # noqa: F401
        cmd += ["-n", "4"]
    except ImportError:
        pass
    code, log, seconds = _run(cmd, timeout=900)
    lines = [f"`{' '.join(cmd[1:4])}`: exit {code}, {seconds:.0f} s"]
    if not xml.exists():
        return False, lines + ["", "```", log[-3000:], "```"]
    suite = ElementTree.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = suite.findall("testcase")
    failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c for c in cases if c.find("skipped") is not None]
    lines.append(f"- {len(cases) - len(failed) - len(skipped)} passed, {len(failed)} failed, {len(skipped)} skipped")
    reasons = sorted({(c.find("skipped").get("message") or "").strip() for c in skipped})
    lines += [f"- skipped: {r}" for r in reasons if r]
    for c in failed:
        problem = c.find("failure") if c.find("failure") is not None else c.find("error")
        lines.append(f"- FAILED `{c.get('name')}`: {(problem.get('message') or '').splitlines()[0][:300]}")
    slowest = sorted(cases, key=lambda c: -float(c.get("time", 0)))[:5]
    lines.append("- slowest: " + ", ".join(f"`{c.get('name')}` {float(c.get('time', 0)):.0f} s" for c in slowest))
    return code == 0, lines


def _kernels(tmp: Path) -> tuple[bool, list[str]]:
    rows_file = tmp / "kernels.json"
    code, log, seconds = _run([sys.executable, "-m", "distattn.kernels.bench", "--seq-lens", "1024", "8192", "32768",
                               "--json", str(rows_file)], timeout=600)
    lines = [f"`python -m distattn.kernels.bench --seq-lens 1024 8192 32768`: exit {code}, {seconds:.0f} s; "
             f"{log.splitlines()[0] if log else ''}", ""]
    if code != 0 or not rows_file.exists():
        return False, lines + ["```", log[-3000:], "```"]
    rows = json.loads(rows_file.read_text())
    columns = list(rows[0])
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |"
              for r in rows]
    return True, lines


def _training(tmp: Path, steps: int, seq_len: int) -> tuple[bool, list[str]]:
    lines = [f"1 GPU under torchrun, bf16, full activation checkpointing, {seq_len:,} tokens per step, {steps} steps; "
             f"means over steps {WARMUP_STEPS + 1}..{steps}", "",
             "| backend | tokens/s | MFU | peak GiB | loss (first -> last) | wall s |", "|---|---|---|---|---|---|"]
    ok = True
    for backend, compiled, exact in (("triton", False, False), ("torch", False, False), ("triton", True, False),
                                     ("triton", False, True)):
        name = backend + (" + compile" if compiled else "") + (" + deterministic" if exact else "")
        out = tmp / f"run_{backend}_{compiled}_{exact}"
        cfg = tmp / f"{backend}_{compiled}_{exact}.yaml"
        cfg.write_text(TRAIN.format(seq_len=seq_len, backend=backend, steps=steps, out=out,
                                    compile=str(compiled).lower(), deterministic=str(exact).lower()))
        code, log, seconds = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                                   "-m", "distattn.cli", "train", str(cfg)], timeout=600)
        metrics = out / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        if code != 0 or len(rows) < steps:
            ok = False
            lines.append(f"| {name} | failed (exit {code}): {log.strip().splitlines()[-1] if log.strip() else ''} "
                         f"| | | | {seconds:.0f} |")
            continue
        warm = rows[WARMUP_STEPS:]
        mfu = [r["mfu"] for r in warm if r.get("mfu") is not None]
        lines.append(f"| {name} | {statistics.mean(r['tokens_per_s'] for r in warm):,.0f} | "
                     f"{(f'{statistics.mean(mfu):.1%}' if mfu else 'n/a')} | {max(r['peak_memory_gib'] for r in rows):.1f} | "
                     f"{rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f} | {seconds:.0f} |")
    return ok, lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="gpu_report.md", help="the Markdown report to write")
    parser.add_argument("--steps", type=int, default=15, help="training steps per backend")
    parser.add_argument("--seq-len", type=int, default=16384, help="tokens per training step")
    args = parser.parse_args(argv)
    import torch

    out = Path(args.out)
    title = f"# distattn GPU report ({time.strftime('%Y-%m-%d %H:%M')})"
    if not torch.cuda.is_available():
        out.write_text(f"{title}\n\nNo CUDA GPU on this machine ({platform.node()}): nothing was measured. Run "
                       f"`bash scripts/gpu_report.sh` where `nvidia-smi` lists a GPU.\n")
        print(f"no GPU on this machine: wrote {out}, which says so")
        return 0
    t0 = time.perf_counter()
    parts, ok = [title, "", *_environment()], True
    with tempfile.TemporaryDirectory(prefix="distattn-gpu-report-") as tmp:
        for name, run in (("GPU suite", lambda: _suite(Path(tmp))), ("Kernel benchmark (TFLOP/s)",
                                                                    lambda: _kernels(Path(tmp))),
                          ("Training", lambda: _training(Path(tmp), args.steps, args.seq_len))):
            print(f"gpu report: {name} ...", flush=True)
            passed, lines = run()
            ok &= passed
            parts += ["", f"## {name}" + ("" if passed else " -- FAILED"), "", *lines]
            out.write_text("\n".join(parts) + "\n")   # what is done so far survives a stop
    parts += ["", f"Report written in {time.perf_counter() - t0:.0f} s."]
    out.write_text("\n".join(parts) + "\n")
    print(f"gpu report: {'all parts passed' if ok else 'some part FAILED'}; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
