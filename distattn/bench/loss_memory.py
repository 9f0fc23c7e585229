"""Peak memory of the LM loss, forward + backward: plain cross-entropy over full logits vs
``distattn.train.model.loss.chunked_cross_entropy``.

    python -m distattn.bench.loss_memory           # 16K tokens x 128256 vocab x 4096, bf16
    python -m distattn.bench.loss_memory --json

The full size cannot run here (the plain loss alone needs > 20 GB), so it is measured without
allocating: the inputs are ``meta`` tensors (shapes only, what FakeTensorMode is built on) and a
``TorchDispatchMode`` adds up the bytes of every live tensor storage after each op; storages freed
in between are noticed through weak references. ``extra`` is the peak above the inputs (hidden,
weight), the two gradients included. The same tracker then runs on real tensors at sizes that fit,
in a fresh subprocess whose peak RSS growth (``ru_maxrss``) is the independent check. Last, the
token counts at which the loss alone would outgrow one GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..train.model.loss import chunked_cross_entropy

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GIB = 2 ** 30


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive while active: ``peak`` (at any op's end) and ``largest``
    (the biggest storage any op created, with its shape). ``track`` counts tensors made before."""

    def __init__(self, *tensors: torch.Tensor):
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.peak = self.largest = 0
        self.largest_shape: tuple[int, ...] = ()
        self.track(*tensors)

    def track(self, *tensors: torch.Tensor, created: bool = False) -> None:
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            ref = StorageWeakRef(t.untyped_storage())
            if ref not in self.live:
                nbytes = t.untyped_storage().nbytes()
                self.live[ref] = nbytes
                if created and nbytes > self.largest:
                    self.largest, self.largest_shape = nbytes, tuple(t.shape)
        self.peak = max(self.peak, self.now())

    def now(self) -> int:
        return sum(self.live.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # what the previous ops' callers dropped is gone before this op allocates
        for ref in [r for r in self.live if r.expired()]:
            del self.live[ref]
        out = func(*args, **(kwargs or {}))
        self.track(*tree_leaves(out), created=True)
        return out


def plain_loss(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """The trainer's loss before issue 19: full logits, upcast, ``F.cross_entropy``."""
    return F.cross_entropy((h @ w.T).float(), labels, ignore_index=-100, reduction="sum")


def chunked_loss(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    return chunked_cross_entropy(h, w, labels, chunk=chunk)


METHODS = {"plain": plain_loss, "chunked": chunked_loss}


def inputs(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(0)
    if device == "meta":
        h = torch.empty(tokens, hidden, dtype=dtype, device="meta")
        w = torch.empty(vocab, hidden, dtype=dtype, device="meta")
        labels = torch.empty(tokens, dtype=torch.long, device="meta")
    else:
        h = (torch.randn(tokens, hidden, generator=g) * 0.5).to(dtype)
        w = (torch.randn(vocab, hidden, generator=g) * 0.5).to(dtype)
        labels = torch.randint(0, vocab, (tokens,), generator=g)
    return h.requires_grad_(), w.requires_grad_(), labels


def measure(method: str, tokens: int, vocab: int, hidden: int, chunk: int, dtype: torch.dtype,
            device: str = "meta") -> dict:
    """Forward + backward of one loss under ``LiveBytes``; bytes above the inputs."""
    h, w, labels = inputs(tokens, vocab, hidden, dtype, device)
    with LiveBytes(h, w, labels) as tracker:
        base = tracker.now()
        METHODS[method](h, w, labels, chunk).backward()
    return {"method": method, "tokens": tokens, "extra_bytes": tracker.peak - base,
            "largest_bytes": tracker.largest, "largest_shape": list(tracker.largest_shape)}


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def _child(method: str, tokens: int, vocab: int, hidden: int, chunk: int, dtype: str) -> None:
    """In a fresh interpreter: peak RSS growth of one forward + backward, and the tracker's view."""
    dt = DTYPES[dtype]
    small = inputs(256, 512, hidden, dt, "cpu")
    with LiveBytes():  # load the kernels and what the dispatch mode pulls in, start the thread pool
        METHODS[method](*small, 16).backward()
    h, w, labels = inputs(tokens, vocab, hidden, dt, "cpu")
    base = _rss_kib()  # large blocks are mmap'ed, so RSS rises and falls with live tensors
    with LiveBytes(h, w, labels) as tracker:
        base_tracked = tracker.now()
        METHODS[method](h, w, labels, chunk).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"rss_extra_bytes": (peak - base) * 1024,
                      "real_tracker_extra_bytes": tracker.peak - base_tracked}))


def validate(method: str, tokens: int, vocab: int, hidden: int, chunk: int, dtype: str) -> dict:
    code = (f"from distattn.bench.loss_memory import _child; "
            f"_child({method!r}, {tokens}, {vocab}, {hidden}, {chunk}, {dtype!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"measurement subprocess failed: {done.stderr[-2000:]}")
    real = json.loads(done.stdout.strip().splitlines()[-1])
    fake = measure(method, tokens, vocab, hidden, chunk, DTYPES[dtype])
    return {"method": method, "tokens": tokens, "hidden": hidden, "dtype": dtype,
            "meta_tracker_extra_bytes": fake["extra_bytes"], **real}


def max_tokens(method: str, budget: float, vocab: int, hidden: int, chunk: int, dtype: torch.dtype) -> dict:
    """Largest token count (a multiple of ``chunk``) whose loss, inputs included, fits ``budget``
    bytes. At chunk multiples the footprint is affine in the tokens: fit two points, check a third
    (tracing the answer itself could mean millions of chunks)."""
    def total(t: int) -> int:
        in_bytes = (t * hidden + vocab * hidden) * dtype.itemsize + t * 8
        return measure(method, t, vocab, hidden, chunk, dtype)["extra_bytes"] + in_bytes
    t1, t2, t3 = 4 * chunk, 8 * chunk, 16 * chunk
    b1, b2, b3 = total(t1), total(t2), total(t3)
    slope = (b2 - b1) / (t2 - t1)
    fixed = b1 - slope * t1
    return {"method": method, "max_tokens": max(0, int((budget - fixed) // slope) // chunk * chunk),
            "bytes_per_token": slope, "fixed_bytes": fixed, "fit_error_bytes": b3 - (fixed + slope * t3)}


def _gib(b: float) -> str:
    return f"{b / GIB:8.2f}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens of one rank's shard (default 16384)")
    ap.add_argument("--vocab", type=int, default=128256, help="vocabulary size (default 128256, Llama 3)")
    ap.add_argument("--hidden", type=int, default=4096, help="model dim D (default 4096)")
    ap.add_argument("--chunk", type=int, default=2048, help="chunked loss: tokens per chunk (default 2048)")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16", help="hidden, weight and matmul dtype (default bf16)")
    ap.add_argument("--validate-tokens", type=int, nargs="*", default=[2048, 4096],
                    help="real-tensor runs at these token counts (none: skip; default 2048 4096)")
    ap.add_argument("--validate-hidden", type=int, default=16,
                    help="D of the real runs (default 16: memory is T x V; CPU time grows with D)")
    ap.add_argument("--validate-dtype", choices=DTYPES, default="fp32",
                    help="dtype of the real runs (default fp32: this CPU's bf16 matmul is ~5x slower)")
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory for the OOM table (default 80 GiB)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    a = ap.parse_args(argv)
    dtype = DTYPES[a.dtype]
    full = [measure(m, a.tokens, a.vocab, a.hidden, a.chunk, dtype) for m in METHODS]
    checks = [validate(m, t, a.vocab, a.validate_hidden, a.chunk, a.validate_dtype)
              for t in a.validate_tokens for m in METHODS]
    fits = [max_tokens(m, a.gpu_gib * GIB, a.vocab, a.hidden, a.chunk, dtype) for m in METHODS]
    result = {"config": vars(a), "full_size": full, "validation": checks, "max_tokens": fits}
    if a.json:
        print(json.dumps(result))
        return result
    print(f"Loss forward + backward, {a.tokens} tokens x {a.vocab} vocab x {a.hidden} dim, {a.dtype}, "
          f"chunk {a.chunk} (meta tensors, nothing allocated)")
    print(f"  fp32 logits [T, V] alone: {_gib(a.tokens * a.vocab * 4).strip()} GiB; "
          f"inputs (hidden + weight): {_gib((a.tokens + a.vocab) * a.hidden * dtype.itemsize).strip()} GiB")
    print(f"  {'method':8s} {'peak extra GiB':>15s} {'largest tensor':>28s}")
    for r in full:
        print(f"  {r['method']:8s} {_gib(r['extra_bytes']):>15s} "
              f"{_gib(r['largest_bytes']).strip() + ' GiB ' + str(r['largest_shape']):>28s}")
    print(f"  chunked / plain: {full[1]['extra_bytes'] / full[0]['extra_bytes']:.3f}")
    if checks:
        print(f"\nTracker check on real tensors ({a.vocab} vocab, D={a.validate_hidden}, {a.validate_dtype}; "
              f"fresh process each), peak extra GiB")
        print(f"  {'method':8s} {'tokens':>7s} {'meta tracker':>13s} {'real tracker':>13s} {'RSS growth':>11s} "
              f"{'RSS/meta':>9s}")
        for c in checks:
            print(f"  {c['method']:8s} {c['tokens']:7d} {_gib(c['meta_tracker_extra_bytes']):>13s} "
                  f"{_gib(c['real_tracker_extra_bytes']):>13s} {_gib(c['rss_extra_bytes']):>11s} "
                  f"{c['rss_extra_bytes'] / c['meta_tracker_extra_bytes']:9.3f}")
    print(f"\nLargest shard whose loss alone (inputs + peak extra) fits {a.gpu_gib:g} GiB "
          f"({a.vocab} vocab x {a.hidden} dim, {a.dtype}; the model's activations and states come on top)")
    print(f"  {'method':8s} {'max tokens':>11s} {'bytes/token':>12s} {'fixed GiB':>10s} {'fit check (B)':>14s}")
    for f in fits:
        print(f"  {f['method']:8s} {f['max_tokens']:11d} {f['bytes_per_token']:12.0f} {_gib(f['fixed_bytes']):>10s} "
              f"{f['fit_error_bytes']:14.0f}")
    return result


if __name__ == "__main__":
    main()
