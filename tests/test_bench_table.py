"""`distattn bench`'s closing table lines up whatever the longest scheduler and mask names are (issue 58)."""

from distattn.cli.perf_cmds import results_table


def _row(scheduler, mask, seq_len):
    return {"scheduler": scheduler, "world_size": 4, "seq_len": seq_len, "mask": mask, "fwd_bwd_ms": 12.5,
            "tflops": 0.0031, "flops_imbalance": 1.0, "send_bytes": 3 << 20, "peak_mem_mb": 210.0}


def test_the_table_columns_line_up():
    rows = [_row("ring", "causal", 2048), _row("deepspeed-ulysses-attention", "causal-blockwise", 131072)]
    lines = results_table(rows).splitlines()
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1, lines
    # every column ends where the header's does
    for title in ("world", "seq", "fwd+bwd ms", "peak MB"):
        end = lines[0].index(title) + len(title)
        assert all(line[end:end + 1] in (" ", "") and line[end - 1] != " " for line in lines), (title, lines)
