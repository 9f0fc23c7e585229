"""One command for the GPU report: ``bash scripts/gpu_report.sh [REPORT.md]``, which runs
``python -m distattn.bench.gpu_report`` (a forwarder to this module's ``main``: the report plans with the
trainer's config loader and memory estimate, so it lives in the train layer, beside the trainer
benchmarks; its plan is :mod:`.bench_gpu_plan`, its runs :mod:`.bench_gpu_runner`, its tables
:mod:`.bench_gpu_tables`).

On a machine with an NVIDIA GPU it runs, within ``--budget-s`` (default 570 s: the report is meant to
take under 10 minutes on one H100), and writes to one Markdown file, each part as soon as it is done:

1. **GPU suite**: ``tests/test_gpu.py`` (pytest-xdist's 4 workers where installed; ~140-166 s).
2. **Kernel TFLOP/s**: ``python -m distattn.kernels.bench`` -- forward, backward and forward+backward
   of ``triton``, ``torch`` (PyTorch's FlashAttention-2) and FlashAttention-3 (when it imports), at
   8K, 32K and 128K tokens per sequence, causal and documents, head dims 64, 128 and 192/128 (MLA),
   bf16; then 1, 4 and 32 query heads per call (KV heads ``max(1, H // 4)``, Llama-3 8B's group;
   equal work per call: a Ulysses rank's share of the heads) at 4K and 32K, causal, head dim 128, and
   their speed per FLOP over 32 heads'; then CAD-shaped calls (few query rows against long keys, each
   direction timed apart) beside the tile model's price (:mod:`distattn.costmodel.tiles`: shipped, and fitted to
   the backend's own rows); capped at :data:`KERNEL_BUDGET_S` (cases past it are listed as skipped).
   Every causal row is also written to ``REPORT_kernels.csv`` beside the report, for ``distattn cluster
   kernel-fit``.
3. **Memory: estimate vs measured**: short one-GPU bf16 trainings of the 2048-dim 4-layer model with
   activation checkpointing none, full, offload and offload + tiled MLP at 16K and 128K tokens, and
   full + ``cpu_offload`` at the longest length that fits the GPU by the estimate; beside each, the
   estimate (:mod:`distattn.sim.memory_model`, what ``distattn train CONFIG --dry-run`` prints) and the
   run's ``torch.cuda.max_memory_allocated`` (the trainer's ``peak_memory_gib``: the allocator's peak
   since the process started, never reset, so setup counts). These runs share the GPU a few at a time
   (each process has its own allocator peak; no time of theirs is reported).
4. **8B-shaped stack on one GPU**: 4 Llama-3-8B layers (dim 4096, GQA 32/8, ffn 14336, vocab 128256) at
   32K and 128K tokens per step, each with the cheapest checkpointing/offload setting the estimate says
   fits: tokens/s, MFU, peak memory.
5. **Training per backend**: ``triton``, ``torch`` and ``triton`` + ``train.deterministic``, 16K
   tokens, full checkpointing (the ``train.compile`` variant was cut to keep the report under 10 min).

A **Goals** table (:mod:`.bench_gpu_tables`) near the top marks each of the issue's goals met / NOT met
from the numbers measured so far. The runs, the settings and lengths the estimate picks and a rough time
budget are in ``--plan`` (no GPU needed: ``--gpu-memory-gib`` stands for the GPU's memory). Without a
GPU it writes a report that says so and exits 0. Exit code 1 when a part failed (the report still lists
the rest); goals not met do not fail it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from . import gpu_plan as plan
from . import gpu_tables as tables
from .gpu_runner import ROOT, run_alone, run_waves

BUDGET_S = 570              # the whole report
KERNEL_BUDGET_S = 120       # the kernel benchmark's cases (its own start and autotuning come on top)
KERNEL_ARGS = ["--seq-lens", "8192", "32768", "131072", "--masks", "causal", "doc", "--head-dims", "64", "128",
               "192/128", "--backends", "triton", "torch", "fa3", "--rep-budget-s", "0.3",
               "--heads", "1", "4", "32", "--heads-seq-lens", "4096", "32768", "--heads-head-dim", "128",
               # CAD's tasks at 256 GPUs / 512K on ProLong hold ~1.3K query rows against up to 131K keys
               "--cad-shapes", "512:32768", "2048:32768", "1282:131072", "4096:131072", "16384:131072"]
PARTS = ("GPU suite", "Kernel TFLOP/s", "Memory: estimate vs measured", "8B-shaped stack on one GPU",
         "Training per backend")


def _run(cmd: list[str], timeout: float, prefix: str) -> tuple[int, str, float]:
    """Run ``cmd``, printing its lines as they come (``prefix`` first) -> (exit code, output, seconds)."""
    t0, lines = time.perf_counter(), []
    # its own process group: a timeout stops pytest-xdist's workers too, and the GPU memory they hold
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def pump():
        for line in proc.stdout:
            lines.append(line)
            print(prefix + line, end="", flush=True)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = 124
        lines.append(f"\n(stopped after {timeout:.0f} s)")
    reader.join(timeout=5)
    return code, "".join(lines), time.perf_counter() - t0


def _environment() -> list[str]:
    import torch

    lines = [f"- GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}, "
             f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB), "
             f"{torch.cuda.device_count()} visible"]
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


def _suite(tmp: Path, timeout: float) -> tuple[bool, list[str]]:
    xml = tmp / "suite.xml"
    cmd = [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    try:
        import xdist  # noqa: F401
        cmd += ["-n", "4"]
    except ImportError:
        pass
    code, log, seconds = _run(cmd, timeout, "  suite: ")
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


def _kernels(tmp: Path, budget: float, table: Path) -> tuple[bool, list[str], list[dict]]:
    rows_file = tmp / "kernels.json"
    args = KERNEL_ARGS + ["--budget-s", f"{budget:.0f}", "--table", str(table), "--json", str(rows_file)]
    code, log, seconds = _run([sys.executable, "-m", "distattn.kernels.bench", *args], budget + 90, "  kernels: ")
    lines = [f"`python -m distattn.kernels.bench {' '.join(args[:-2])}`: exit {code}, {seconds:.0f} s "
             f"(its causal rows, for `distattn cluster kernel-fit {table.name} --fit-on backend=NAME`: {table.name})",
             "",
             log.splitlines()[0] if log else "", "",
             "TFLOP/s; bwd: 2.5x the forward's FLOPs over the backward's time alone; f+b: 3.5x over forward + "
             "backward. Goals: triton f+b >= 1.0x torch (FA2) at hd 64 and 128; triton bwd >= 350 TFLOP/s at 32K "
             "causal hd 128.", ""]
    if code != 0 or not rows_file.exists():
        return False, lines + ["```", log[-3000:], "```"], []
    rows = json.loads(rows_file.read_text())
    return True, lines + tables.kernel_table(rows) + tables.heads_table(rows) + tables.cad_table(rows), rows


def _gpu_bytes(gib: float | None) -> int:
    if gib is not None:
        return int(gib * plan.GIB)
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def _kernel_arg(name: str) -> list[str]:
    """The values of one option of :data:`KERNEL_ARGS`."""
    i = KERNEL_ARGS.index(name) + 1
    j = next((k for k in range(i, len(KERNEL_ARGS)) if KERNEL_ARGS[k].startswith("--")), len(KERNEL_ARGS))
    return KERNEL_ARGS[i:j]


def plan_lines(gpu_bytes: int, steps: int, seq_len: int, peak_tflops: float = 989.0) -> list[str]:
    """What the report would run on a GPU of ``gpu_bytes`` (``--plan``), and a rough time per part."""
    from ..kernels.tools.bench import cad_shape, case_flops, case_lens, cases, head_cases, head_dims, unsupported

    gib = gpu_bytes / plan.GIB
    lines = [f"distattn GPU report plan for a GPU of {gib:.1f} GiB (fits: estimate + {plan.FIT_MARGIN:.0%} <= "
             f"{gib:.1f} GiB); rough times at {plan.ASSUMED_MFU:.0%} of {peak_tflops:.0f} TFLOP/s, "
             f"{plan.PROCESS_S} s per training process", "", f"1. GPU suite: tests/test_gpu.py (~{plan.SUITE_S} s)"]
    dims = [head_dims(d) for d in _kernel_arg("--head-dims")]
    backends, todo, case_lines = _kernel_arg("--backends"), [], []
    for d, dv, s, mask in cases([int(n) for n in _kernel_arg("--seq-lens")], _kernel_arg("--masks"), dims):
        runs = [b for b in backends if not unsupported(b, mask, d, dv)]
        todo.append((case_flops(case_lens(s, mask, 32768), mask != "full", 2048 // dv, d, dv), len(runs)))
        case_lines.append(f"   kernel case hd {d if d == dv else f'{d}/{dv}'} {s // 1024}K {mask}: "
                          f"{', '.join(runs) or '-'}")
    hd = int(_kernel_arg("--heads-head-dim")[0])
    for s, h, kv, lens in head_cases([int(n) for n in _kernel_arg("--heads-seq-lens")],
                                     [int(n) for n in _kernel_arg("--heads")], 32768):
        runs = [b for b in backends if not unsupported(b, "causal", hd, hd, kv != h)]
        todo.append((case_flops(lens, True, h, hd, hd), len(runs)))
        case_lines.append(f"   kernel case hd {hd} {s // 1024}K causal, {h}/{kv} heads per call, {len(lens)} x "
                          f"{s // 1024}K tokens: {', '.join(runs) or '-'}")
    for q, k in (cad_shape(t) for t in _kernel_arg("--cad-shapes")):
        runs = [b for b in backends if not unsupported(b, "causal", hd, hd, True, True)]
        todo.append((case_flops([q], True, 32, hd, hd) * (2 * k - q) / q, len(runs)))   # q rows against k keys
        case_lines.append(f"   kernel case hd {hd} CAD-shaped: {q} query rows against {k // 1024}K keys, 32/8 heads: "
                          f"{', '.join(runs) or '-'}")
    kernel_s = min(plan.kernel_seconds(todo, float(_kernel_arg("--rep-budget-s")[0])),
                   KERNEL_BUDGET_S + plan.KERNEL_START_S)
    lines += [f"2. kernel benchmark: {len(todo)} cases x {', '.join(backends)} (~{kernel_s:.0f} s, capped at "
              f"{KERNEL_BUDGET_S} s of cases)", *case_lines]
    if "fa3" in backends and unsupported("fa3", "causal", 128, 128):
        lines.append("   (fa3 does not import here: where flash_attn_3 is installed its cases run too)")
    memory = plan.memory_runs(gpu_bytes)
    lines.append("3. memory runs (bf16, one rank; waves share the GPU):")
    for run in memory:
        est = run.estimate()
        lines.append(f"   {run.name:<48} {run.seq_len:>9,} tokens, {run.steps} steps: "
                     f"estimate {est.total / plan.GIB:6.2f} "
                     f"GiB (- runtime {(est.total - est.runtime) / plan.GIB:6.2f}), host {est.host / plan.GIB:.2f} GiB")
    groups = plan.waves([(r.name, r.estimate().total) for r in memory], gpu_bytes)
    by_name = {r.name: r for r in memory}
    memory_s = sum(max(plan.run_seconds(by_name[n], peak_tflops) for n in names) for names in groups)
    lines += [f"   wave {i + 1}: {', '.join(names)}" for i, names in enumerate(groups)]
    lines.append(f"   (~{memory_s:.0f} s)")
    lines.append(f"4. {plan.LLAMA3_8B_4L.name} ({plan.LLAMA3_8B_4L.params / 1e9:.2f} B parameters):")
    for n in plan.STACK_SEQ_LENS:
        cells = [f"{s.label} {plan.TrainRun('', plan.LLAMA3_8B_4L, n, s, 1).estimate().total / plan.GIB:.1f}"
                 for s in plan.BY_COST]
        chosen = plan.choose_setting(plan.LLAMA3_8B_4L, n, gpu_bytes)
        lines.append(f"   {n // 1024}K: chosen {chosen.label if chosen else 'nothing fits'}; estimates GiB: "
                     + "; ".join(cells))
    stack = plan.stack_runs(gpu_bytes)
    stack_s = sum(plan.run_seconds(r, peak_tflops) for r in stack)
    lines += [f"   run {r.name}: {r.steps} steps, means over steps {r.warmup + 1}..{r.steps} "
              f"(~{plan.run_seconds(r, peak_tflops):.0f} s)" for r in stack]
    backend = plan.backend_runs(steps, seq_len)
    backend_s = sum(plan.run_seconds(r, peak_tflops) for r in backend)
    lines.append(f"5. training per backend, {seq_len:,} tokens, {steps} steps: {', '.join(r.name for r in backend)} "
                 f"(~{backend_s:.0f} s)")
    total = plan.SUITE_S + kernel_s + memory_s + stack_s + backend_s
    lines.append(f"rough total: {plan.SUITE_S} + {kernel_s:.0f} + {memory_s:.0f} + {stack_s:.0f} + {backend_s:.0f} "
                 f"= {total:.0f} s (budget {BUDGET_S} s)")
    return lines


class Report:
    """The Markdown file, rewritten whole after every part (what is done so far survives a stop)."""

    def __init__(self, path: Path, head: list[str]):
        self.path, self.head, self.parts = path, head, {}
        self.kernels = self.memory = self.stack = None

    def part(self, name: str, passed: bool, lines: list[str]) -> None:
        self.parts[name] = ["", f"## {name}" + ("" if passed else " -- FAILED"), "", *lines]
        self.write()

    def write(self, tail: list[str] = ()) -> None:
        found = tables.goals(self.kernels, self.memory, self.stack)
        body = [*self.head, "", "## Goals", "", *tables.goals_table(found)]
        body += [line for name in PARTS if name in self.parts for line in self.parts[name]]
        self.path.write_text("\n".join([*body, *tail]) + "\n")


def _say(outcomes) -> None:
    """A progress line per finished run."""
    for o in outcomes:
        peak = f"peak {max(r['peak_memory_gib'] for r in o.rows):.2f} GiB" if o.rows else o.why()
        print(f"gpu report:   {o.run.name}: {len(o.rows)}/{o.run.steps} steps, {peak}, {o.seconds:.0f} s "
              f"({o.together} on the GPU)", flush=True)


def _parts(report: Report, tmp: Path, args: argparse.Namespace, gpu_bytes: int, deadline: float) -> bool:
    """Run the report's parts into ``report`` (scratch files in ``tmp``) -> whether all passed."""
    ok = True
    print("gpu report: GPU suite ...", flush=True)
    passed, lines = _suite(tmp, max(60.0, min(600.0, deadline - time.perf_counter())))
    ok &= passed
    report.part(PARTS[0], passed, lines)

    print("gpu report: kernel TFLOP/s ...", flush=True)
    passed, lines, report.kernels = _kernels(tmp, max(10.0, min(KERNEL_BUDGET_S, deadline - time.perf_counter()
                                                                - 300)),
                                             report.path.with_name(report.path.stem + "_kernels.csv"))
    ok &= passed
    report.part(PARTS[1], passed, lines)

    print("gpu report: memory, estimate vs measured ...", flush=True)
    outcomes = run_waves(plan.memory_runs(gpu_bytes), tmp, gpu_bytes, deadline - 130, _say)
    report.memory = tables.memory_rows(outcomes)
    ok &= all(o.ok for o in outcomes)
    report.part(PARTS[2], all(o.ok for o in outcomes), [
        f"bf16, one rank, {plan.SMALL.name} ({plan.SMALL.params / 1e6:.0f} M parameters), stdlib data; "
        f"{plan.MEMORY_STEPS} steps ({plan.OFFLOAD_STEPS} for the cpu_offload run). The allocator does not see "
        f"the estimate's 4 GiB CUDA runtime: the ratio is over the estimate less it. Goal: within 10%.", "",
        *tables.memory_table(report.memory)])

    print("gpu report: 8B-shaped stack ...", flush=True)
    stack_plan = plan.stack_runs(gpu_bytes)
    outcomes = run_alone(stack_plan, tmp, deadline - 55, _say)
    report.stack = tables.stack_rows(outcomes)
    missing = [n for n in plan.STACK_SEQ_LENS if n not in {r.seq_len for r in stack_plan}]
    ok &= all(o.ok for o in outcomes) and not missing
    report.part(PARTS[3], all(o.ok for o in outcomes) and not missing, [
        f"{plan.LLAMA3_8B_4L.name}: dim 4096, GQA 32/8, ffn 14336, vocab 128256 untied "
        f"({plan.LLAMA3_8B_4L.params / 1e9:.2f} B parameters), bf16, attention backend auto, stdlib data "
        f"(documents packed); means over steps {plan.STACK_WARMUP + 1}.. (step 1 autotunes). "
        f"Setting per length: the first of {', '.join(s.label for s in plan.BY_COST)} whose estimate + 10% fits "
        f"{gpu_bytes / plan.GIB:.1f} GiB.", "", *tables.stack_table(report.stack),
        *[f"- {n:,} tokens: no setting fits by the estimate" for n in missing]])

    print("gpu report: training per backend ...", flush=True)
    outcomes = run_alone(plan.backend_runs(args.steps, args.seq_len), tmp, deadline, _say)
    ok &= all(o.ok for o in outcomes)
    report.part(PARTS[4], all(o.ok for o in outcomes), [
        f"1 GPU, bf16, full activation checkpointing, {args.seq_len:,} tokens per step, {args.steps} steps; means "
        f"over steps {plan.BACKEND_WARMUP + 1}..{args.steps}", "", *tables.backend_table(outcomes)])
    return ok


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m distattn.bench.gpu_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="gpu_report.md", help="the Markdown report to write")
    parser.add_argument("--steps", type=int, default=15, help="training steps per backend (part 5)")
    parser.add_argument("--seq-len", type=int, default=16384, help="tokens per training step (part 5)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="runs that would start past it are skipped")
    parser.add_argument("--plan", action="store_true", help="print what would run and exit (no GPU needed)")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="the GPU memory the estimate plans for (default: this GPU's; --plan without one: 80)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    import torch

    gpu = torch.cuda.is_available()
    if args.plan:
        print("\n".join(plan_lines(_gpu_bytes(args.gpu_memory_gib if args.gpu_memory_gib or gpu else 80.0),
                                   args.steps, args.seq_len)))
        return 0
    out = Path(args.out)
    title = f"# distattn GPU report ({time.strftime('%Y-%m-%d %H:%M')})"
    if not gpu:
        out.write_text(f"{title}\n\nNo CUDA GPU on this machine ({platform.node()}): nothing was measured. Run "
                       f"`bash scripts/gpu_report.sh` where `nvidia-smi` lists a GPU (`--plan` shows what it runs).\n")
        print(f"no GPU on this machine: wrote {out}, which says so")
        return 0
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    gpu_bytes = _gpu_bytes(args.gpu_memory_gib)
    report = Report(out, [title, "", *_environment()])
    with tempfile.TemporaryDirectory(prefix="distattn-gpu-report-") as tmp_name:
        ok = _parts(report, Path(tmp_name), args, gpu_bytes, deadline)
    report.write(["", f"Report written in {time.perf_counter() - t0:.0f} s (budget {args.budget_s:.0f} s)."])
    print(f"gpu report: {'all parts passed' if ok else 'some part FAILED'}; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
