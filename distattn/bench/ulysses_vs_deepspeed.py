"""Our ``ulysses`` beside DeepSpeed's ``DistributedAttention`` on the same inputs, in one run.

    python -m distattn.bench.ulysses_vs_deepspeed [--world-size 4] [--seq-len 8192] [--repeats 5]

Both sides use the same local kernel (``distattn.local_attention``, document
mask included) so the comparison is of the sequence-parallel machinery: the
all-to-alls and the layout changes around them. DeepSpeed's layout is
``[s, b, h, d]``; it needs the sequence length divisible by the world size.
Prints each side's fwd+bwd ms (slowest rank, median of repeats), the ratio
(DeepSpeed / ours; > 1 means we are faster) and the largest difference
between the two outputs and input gradients.

DeepSpeed compiles a CPU communication op on first use (~30 s); it is cached
under ``extensions_dir`` (default ``.venv/torch_extensions``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..runtime.api import attention, local_attention, plan
from ..planning.doclens import pack
from ..distributed.spawn import run_distributed
from ..distributed.timing import slowest_rank, time_interleaved

DEFAULT_EXTENSIONS_DIR = str(Path(__file__).resolve().parents[2] / ".venv" / "torch_extensions")
_log = logging.getLogger(__name__)


class _AtDebug(logging.Handler):
    """DeepSpeed's records as ours: at debug, errors at error."""

    def emit(self, record: logging.LogRecord) -> None:
        _log.log(logging.ERROR if record.levelno >= logging.ERROR else logging.DEBUG, "deepspeed: %s",
                 record.getMessage())


def deepspeed_attention_class(backend: str):
    """DeepSpeed's ``DistributedAttention`` with its communication started on ``backend`` (None: DeepSpeed
    is not installed). What DeepSpeed prints meanwhile on a CPU machine -- that it found no accelerator,
    that it built its CPU communication op -- goes through our logging at debug, not to the console."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            import deepspeed.comm
            from deepspeed.sequence.layer import DistributedAttention

            # (its handler holds the stream it found at import: ours for now; every record goes to _AtDebug)
            logging.getLogger("DeepSpeed").handlers[:] = [_AtDebug()]
            deepspeed.comm.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    except ImportError:
        return None
    finally:
        for line in said.getvalue().splitlines():
            _log.debug("deepspeed: %s", line)
    return DistributedAttention


def _rank_main(doc_lens, heads, head_dim, dtype, repeats, extensions_dir):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir)
    DistributedAttention = deepspeed_attention_class("gloo")
    if DistributedAttention is None:
        raise ImportError("this bench runs DeepSpeed, which is not installed: pip install 'distattn[deepspeed]'")
    group = dist.group.WORLD
    total = sum(doc_lens)
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(total, heads, head_dim, generator=g).to(dtype) for _ in range(4))
    ours_plan = plan(doc_lens, group, scheduler="ulysses")
    q_l, k_l, v_l, dout_l = (ours_plan.shard(t) for t in (q, k, v, dout))

    def ours():
        x = [t.detach().requires_grad_() for t in (q_l, k_l, v_l)]
        out = attention(*x, ours_plan)
        out.backward(dout_l)
        return out.detach(), *(t.grad for t in x)

    ds_attn = DistributedAttention(lambda a, b, c: local_attention(a[:, 0], b[:, 0], c[:, 0], doc_lens)[:, None],
                                   group, scatter_idx=2, gather_idx=0)

    def theirs():
        x = [t.detach()[:, None].requires_grad_() for t in (q_l, k_l, v_l)]  # [s/P, b=1, h, d]
        out = ds_attn(*x, 1)
        out.backward(dout_l[:, None])
        return out.detach()[:, 0], *(t.grad[:, 0] for t in x)

    # alternating the two so drift hits both alike; the first round warms up connections and caches
    timings = time_interleaved([ours, theirs], repeats, warmup=1, barrier=True)
    ms_ours, ms_theirs = (1e3 * s for s in slowest_rank([t.median for t in timings]))
    res_ours, res_theirs = (t.result for t in timings)
    diff = max((a.double() - b.double()).abs().max().item() for a, b in zip(res_ours, res_theirs))
    return {"ours_ms": ms_ours, "deepspeed_ms": ms_theirs, "ratio": ms_theirs / ms_ours, "max_diff": diff}


def compare(world_size: int = 4, seq_len: int = 8192, heads: int = 8, head_dim: int = 64, dtype=torch.float32,
            repeats: int = 3, doc_lens: list[int] | None = None, extensions_dir: str = DEFAULT_EXTENSIONS_DIR,
            timeout: float = 900.0) -> list[dict]:
    """Run both on ``world_size`` gloo ranks; one result dict per rank (times are the slowest rank's)."""
    if seq_len % world_size:
        raise ValueError(f"DeepSpeed's DistributedAttention needs seq_len divisible by world_size "
                         f"({seq_len} % {world_size} != 0)")
    doc_lens = doc_lens or pack(seq_len, median=max(1, seq_len // 8), seed=0)
    return run_distributed(_rank_main, world_size, doc_lens, heads, head_dim, dtype, repeats, extensions_dir,
                           timeout=timeout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--median-doc", type=int, default=None,
                        help="median document length of the packed mix (default seq_len / 8); short documents "
                             "make attention cheap, so the all-to-alls dominate")
    args = parser.parse_args(argv)
    docs = pack(args.seq_len, median=args.median_doc or max(1, args.seq_len // 8), seed=0)
    print(f"ulysses vs DeepSpeed DistributedAttention: {args.world_size} gloo ranks, {args.seq_len} tokens in "
          f"{len(docs)} documents, {args.heads} heads x {args.head_dim}, fp32", flush=True)
    r = compare(args.world_size, args.seq_len, args.heads, args.head_dim, repeats=args.repeats, doc_lens=docs)[0]
    print(f"{'ours ms':>10} {'deepspeed ms':>13} {'ratio':>6} {'max diff':>9}")
    print(f"{r['ours_ms']:>10.1f} {r['deepspeed_ms']:>13.1f} {r['ratio']:>6.2f} {r['max_diff']:>9.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
