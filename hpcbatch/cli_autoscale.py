"""`hpcbatch pool autoscale enable|disable|evaluate` and what `pool show` says of it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import click

from hpcbatch.errors import ValidationError


def _cli():
    from hpcbatch import cli
    return cli


@click.group("autoscale")
def autoscale() -> None:
    """Size a pool by a formula (Azure Batch's autoscale language, see README)."""


def _formula(formula: str | None, formula_file: str | None) -> str:
    if (formula is None) == (formula_file is None):
        raise ValidationError("--formula", "give the formula with --formula TEXT or "
                              "--formula-file FILE (one of them)")
    if formula_file is not None:
        try:
            return Path(formula_file).read_text()
        except OSError as exc:
            raise ValidationError("--formula-file", f"{formula_file}: "
                                  f"{exc.strerror or exc}") from None
    return formula or ""


@autoscale.command("enable")
@click.argument("pool_id")
@click.option("--formula", help="The formula (statements separated by ';' or lines).")
@click.option("--formula-file", type=click.Path(dir_okay=False),
              help="Read the formula from FILE.")
@click.option("--interval", default="30s", show_default=True,
              help="How often it is evaluated: 30s, 5m, 1h (at least 1s).")
def autoscale_enable(pool_id: str, formula: str | None, formula_file: str | None,
                     interval: str) -> None:
    """Evaluate a formula on POOL now and every --interval; the pool takes the size
    it sets ($TargetNodes)."""
    from hpcbatch.autoscaling import parse_interval
    text = _formula(formula, formula_file)
    seconds = parse_interval(interval)
    cli = _cli()
    with cli._service() as service:
        service.enable_autoscale(pool_id, text, interval_s=seconds)
    cli.out.print(f"pool {pool_id}: autoscale on, every {seconds:g} s", markup=False)


@autoscale.command("disable")
@click.argument("pool_id")
def autoscale_disable(pool_id: str) -> None:
    """Stop autoscaling POOL; it keeps the size it has."""
    cli = _cli()
    with cli._service() as service:
        p = service.disable_autoscale(pool_id)
    cli.out.print(f"pool {pool_id}: autoscale off, target {p.target_nodes} node(s)",
                  markup=False)


@autoscale.command("evaluate")
@click.argument("pool_id")
@click.argument("formula", required=False)
@click.option("--formula-file", type=click.Path(dir_okay=False),
              help="Read the formula from FILE.")
def autoscale_evaluate(pool_id: str, formula: str | None, formula_file: str | None) -> None:
    """Dry run: evaluate FORMULA over POOL's samples and print every variable; the
    pool is unchanged."""
    text = _formula(formula, formula_file)
    cli = _cli()
    with cli._service() as service:
        result = service.evaluate_autoscale(pool_id, text)
    for name, value in result["variables"].items():
        cli.out.print(f"{name} = {value}", markup=False, soft_wrap=True)


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def event_text(e: dict[str, Any]) -> str:
    r = e.get("result") or {}
    if e.get("kind") == "resize":
        text = f"{r.get('from')} -> {r.get('to')} node(s) ({r.get('by', 'resize')}, " \
               f"{r.get('deallocation', 'requeue')})"
    elif r:
        text = f"target {r.get('target_nodes')} ({r.get('deallocation')})"
        if r.get("capped"):
            text += f"; capped: {r['capped']}"
    else:
        text = ""
    return text


def show_lines(p) -> list[str]:
    """What 'pool show' prints of a pool's autoscale and its recent events."""
    lines = []
    if p.autoscale:
        a = p.autoscale
        formula = " ".join(str(a["formula"]).split())
        lines.append(f"autoscale: every {a['interval_s']:g} s: {formula}")
    for e in list(p.autoscale_events)[:10]:
        err = f"  error: {e['error']}" if e.get("error") else ""
        lines.append(f"  {_when(e['at'])}  {e['kind']:<10} {event_text(e)}{err}")
    return lines
