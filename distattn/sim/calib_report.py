"""What ``distattn simulate --calibrate FIT_CSV [--holdout SCORE_CSV]`` prints: the machine model
fitted on one bench (:mod:`distattn.sim.calib_fit`), each row of it and of the holdout bench
predicted beside its measurement, and last the pinned line ``median |error| per scheduler: NAME N%,
...`` of the bench scored (the holdout's when there is one)."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from .calib_fit import START, fit_machine
from .calibrate import Machine, load_model, measure_tile_seconds, prepare_row, save_model, score


def starting_point(model_path, network_path, cores: int | None, probe: Callable):
    """``(machine, network)`` a fit starts from: a saved model's (``model_path``: nothing measured),
    else this machine's -- its cores, a fused call's fixed cost measured, gloo probed (``probe()``: a
    :class:`~distattn.costmodel.network.NetworkProfile`); ``network_path`` (a profile) and ``cores`` win over
    either."""
    from ..costmodel.network import NetworkProfile

    if model_path is not None:
        machine, network = load_model(model_path)
    else:
        import os

        machine, network = replace(START, tile_s=measure_tile_seconds(), cores=float(os.cpu_count() or 1)), None
    if network_path is not None:
        network = NetworkProfile.load(network_path)
    elif network is None:
        network = probe()
    return (machine if cores is None else replace(machine, cores=float(cores))), network


def describe(machine: Machine) -> str:
    """The fitted parameters, in words."""
    return (f"attention on one core: {machine.flop_s / 1e9:.1f} GFLOP/s on long rows, half that at "
            f"{machine.half_keys:.0f} keys per query row; {machine.call_s * 1e3:.3f} ms per step's kernel call "
            f"(each direction); collectives {machine.net_scale:.2f}x the profile's"
            f"{f'; {machine.background:.2f} threads of other work' if machine.background else ''}. Measured: "
            f"{machine.tile_s * 1e3:.3f} ms per fused call; {machine.cores:g} cores; copies "
            f"{machine.copy_bytes_s / 1e9:g} GB/s (assumed)")


def print_rows(rows: list[dict], say: Callable = print) -> None:
    """Each row's measured and predicted ms, error and per-rank time held up by communication."""
    say(f"{'scheduler':<18} {'world':>5} {'seq':>6} {'mask':<10} {'measured ms':>11} {'predicted ms':>12} "
        f"{'error':>7}   held up by communication per rank, ms: measured (the executor's clock) / predicted")
    for r in rows:
        waits = " ".join(f"{m:.0f}/{p:.0f}" for m, p in zip(r["rank_comm_wait_ms"], r["predicted_rank_comm_wait_ms"]))
        say(f"{r['scheduler']:<18} {r['world_size']:>5} {r['seq_len']:>6} {r['mask']:<10} {r['fwd_bwd_ms']:>11.1f} "
            f"{r['predicted_ms']:>12.1f} {r['error']:>+7.0%}   {waits}")


def errors_line(per: dict) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in per.items())


def report(fit_rows: list[dict], score_rows: list[dict] | None, network, start: Machine, pool=None,
           model_path=None, labels=("fit", "holdout"), say: Callable = print) -> dict:
    """Fit on ``fit_rows`` from ``start``, score them and ``score_rows`` (None: the fit bench alone),
    print as the module docstring says; the median |error| per scheduler of the bench scored last.
    ``model_path``: where to save the fitted model."""
    fit_cases = [prepare_row(r, network, pool) for r in fit_rows]
    fit = fit_machine(fit_cases, start=start)
    say(f"fitted on the {labels[0]} bench ({len(fit_rows)} rows, {fit.iterations} iterations): "
        f"{describe(fit.machine)}; network: {network.source}; others' CPU: the bench's cpu_others")
    if model_path is not None:
        save_model(model_path, fit.machine, network)
        say(f"model: {model_path}")
    rows, per = score(fit_cases, fit.machine)
    say(f"{labels[0]} bench:")
    print_rows(rows, say)
    if score_rows is not None:
        say(f"{labels[0]} bench, median |error| per scheduler (in sample): {errors_line(per)}")
        rows, per = score([prepare_row(r, network, pool) for r in score_rows], fit.machine)
        say(f"{labels[1]} bench (never seen by the fit):")
        print_rows(rows, say)
    say("median |error| per scheduler: " + errors_line(per))
    return per


__all__ = ["starting_point", "describe", "print_rows", "report"]
