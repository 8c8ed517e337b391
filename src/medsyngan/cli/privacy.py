"""`medsyngan privacy`: ε for a DP-SGD setting, the noise for a target ε, or the plan of a run's configuration.

Every ε is printed with its neighbouring relation: the reported one is replace-one (``privacy.accounting`` says
why), the add/remove-one figure of Opacus stands beside it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from medsyngan.cli.options import ConfigOption, SetOption
from medsyngan.errors import UserError


def _fmt(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.4f}"


def _print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    console = Console(soft_wrap=True)
    if not console.is_terminal:
        console.width = 160  # a pipe or file gets the whole table, not rich's 80-column fallback
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _single(noise_multiplier: float | None, target_epsilon: float | None, sample_rate: float | None,
            steps: int | None, delta: float) -> None:
    from medsyngan.privacy.accounting import ADD_REMOVE, RELATION, calibrate_noise, epsilons, validate

    if sample_rate is None or steps is None:
        raise UserError("give --sample-rate and --steps (or --config FILE for a run's configuration)")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise UserError("give exactly one of --noise-multiplier (prints ε) and --target-epsilon (prints σ)")
    if steps < 1:
        raise UserError(f"--steps {steps}: the number of private steps must be at least 1")
    if target_epsilon is not None:
        sigma = calibrate_noise(target_epsilon, delta, sample_rate, steps)
        title = f"σ for ε ≤ {target_epsilon:g} ({RELATION}), δ = {delta:g}, q = {sample_rate:g}, {steps} steps"
        rows = [["noise multiplier σ", f"{sigma:.4f}"]]
    else:
        sigma = noise_multiplier
        title = f"ε after {steps} steps, σ = {noise_multiplier:g}, q = {sample_rate:g}, δ = {delta:g}"
        rows = []

    validate(sample_rate, sigma, delta)
    eps = epsilons([(sigma, sample_rate, steps)], delta)
    rows += [[f"ε {RELATION} (reported; dp-accounting PLD)", _fmt(eps["replace_one"])],
             [f"ε {ADD_REMOVE} (Opacus RDP)", _fmt(eps["rdp"])], [f"ε {ADD_REMOVE} (Opacus PRV)", _fmt(eps["prv"])]]
    _print_table(title, ["", "value"], rows)


def _hospital_units(cfg) -> list[tuple[str, int, int]]:
    """(name, patients, images) of every training set the run has: each hospital's, or the one central set."""
    import numpy as np

    from medsyngan.data.api import load_training_data

    dataset = load_training_data(cfg)
    if not cfg.federated.enabled:
        return [("centralized", len(np.unique(dataset.patients)), len(dataset.patients))]
    from medsyngan.data.partition import partition, read_partition_csv
    from medsyngan.federated.plan import split_holdout

    f = cfg.federated
    if f.partition:
        assignment = read_partition_csv(f.partition, dataset)
    else:
        assignment = partition(dataset.patients, dataset.labels, f.hospitals, f.scheme, f.alpha, cfg.data.seed)
    assignment = np.asarray([int(h) for h in assignment])
    out = []
    for hospital in sorted(set(assignment.tolist())):
        patients = dataset.patients[assignment == hospital]
        train_rows, _ = split_holdout(patients, cfg.data.seed, hospital, cfg.federated.holdout_fraction)
        train_patients = patients[train_rows]
        out.append((f"hospital {hospital}", len(np.unique(train_patients)), len(train_patients)))
    return out


def _from_config(config: str, overrides: list[str]) -> None:
    from medsyngan.config import load_config
    from medsyngan.data.labels import describe_source
    from medsyngan.federated.policy import effective_privacy
    from medsyngan.privacy.accounting import (ADD_REMOVE, RELATION, client_level_accountant, describe, plan_dp,
                                              planned_private_steps, resolve_unit)
    from medsyngan.privacy.label_release import label_release_planned, one_off_noise

    cfg = load_config(config, overrides)
    p = cfg.privacy
    min_noise = 0.0
    if cfg.federated.enabled:  # each virtual hospital plans under its policy: the smaller ε and δ, at least its σ
        p, min_noise = effective_privacy(cfg.hospital, p), cfg.hospital.min_noise_multiplier
    steps = planned_private_steps(cfg)
    release_noise = one_off_noise(p, label_release_planned(cfg))
    rows, lines = [], []
    for name, patients, images in _hospital_units(cfg):
        unit = resolve_unit(p.unit, patients, images)
        units = patients if unit == "patient" else images
        plan = plan_dp(units, cfg.train.batch_size, steps, p.target_epsilon, p.delta, unit, where=name,
                       release_noise=release_noise, min_noise=min_noise, clip_only=p.clip_only)
        e = plan.epsilon()
        rows.append([name, unit, str(units), f"{plan.sample_rate:.4g}", str(plan.steps), f"{plan.delta:.3g}",
                     f"{plan.noise_multiplier:.4f}", _fmt(e["reported"]), _fmt(e["add_remove"])])
        lines.append(f"{name}: {describe(e, unit)}")
    if not p.dp:
        typer.echo("note: privacy.dp is off in this configuration; the figures apply once it is switched on")
    if p.clip_only:
        typer.echo("note: privacy.clip_only is on: clipping and sampling without noise (σ = 0), NO privacy (ε = ∞); "
                   "privacy.target_epsilon is not used")
    if p.mean_image_size:
        typer.echo(f"ε includes each hospital's one-off {p.mean_image_size}×{p.mean_image_size} mean-image release "
                   f"(Gaussian, σ = {p.mean_image_noise:g}); σ below is DP-SGD's")
    if cfg.model.condition:
        typer.echo(f"generated labels ({', '.join(cfg.model.condition)}): "
                   f"{describe_source(cfg.train.label_source, cfg.train.label_table, True, p.label_noise)}")
    _print_table(f"DP-SGD plan: target ε = {p.target_epsilon:g} per hospital over the whole run ({RELATION})",
                 ["training set", "unit", "units", "q", "steps", "δ", "σ", f"ε {RELATION}", f"ε {ADD_REMOVE}"], rows)
    for line in lines:
        typer.echo(line)
    if cfg.federated.enabled and p.client_dp:
        acc = client_level_accountant(p.client_noise, cfg.federated.hospitals)
        acc.step(cfg.federated.rounds)
        e = acc.epsilon()
        _print_table(
            "client-level DP-FedAvg (unit = hospital, q = 1: participants are drawn from the public run seed)",
            ["rounds", "δ", "σ", f"ε {RELATION}", f"ε {ADD_REMOVE}"],
            [[str(cfg.federated.rounds), f"{acc.delta:.3g}", f"{p.client_noise:g}", _fmt(e["reported"]),
              _fmt(e["add_remove"])]],
        )


def _from_run(run: Path) -> None:
    """ε per hospital of a federated run, as each hospital's own ledger reported it, with its relation."""
    from medsyngan.privacy.accounting import ADD_REMOVE, RELATION
    from medsyngan.rundir import RunDir
    from medsyngan.workflows.evaluation import hospital_table

    run_dir = RunDir(run)
    run_dir.load_config()  # a clear error when it is not a run directory
    hospitals = [h for h in hospital_table(run_dir) if h["epsilon"] is not None]
    if not hospitals:
        raise UserError(f"{run}: no hospital reported a privacy spend (not a federated run with DP, or no round "
                        "completed)")
    rows = [[f"hospital {h['hospital']}", h["unit"], str(h["rounds"]), _fmt(h["epsilon"]),
             _fmt(h["epsilon_add_remove"]) if h.get("epsilon_add_remove") is not None else "—",
             f"{h['delta']:.3g}" if h.get("delta") is not None else "—", h.get("relation") or RELATION]
            for h in hospitals]
    _print_table(f"ε spent per hospital, from each hospital's own ledger ({run})",
                 ["hospital", "unit", "rounds", "ε", f"ε {ADD_REMOVE}", "δ", "relation"], rows)


def register(app: typer.Typer) -> None:
    privacy_app = typer.Typer(
        help="Privacy figures: ε of a DP-SGD setting, σ for a target ε, a run's per-hospital plan; key files.",
        invoke_without_command=True,
    )
    app.add_typer(privacy_app, name="privacy")

    @privacy_app.callback()
    def privacy(
        ctx: typer.Context,
        noise_multiplier: Annotated[Optional[float], typer.Option(help="σ: prints ε for it.")] = None,
        target_epsilon: Annotated[Optional[float], typer.Option(help="Target ε: prints the σ that meets it.")] = None,
        sample_rate: Annotated[Optional[float], typer.Option(help="q = batch size / privacy units.")] = None,
        steps: Annotated[Optional[int], typer.Option(help="Private steps over the whole run.")] = None,
        delta: Annotated[float, typer.Option(help="δ.")] = 1e-5,
        config: ConfigOption = None,
        set_: SetOption = None,
        run: Annotated[Optional[Path], typer.Option(
            "--run", help="A federated run: ε each hospital's own ledger reported, with the relation.")] = None,
    ) -> None:
        """Print ε (replace-one, and add/remove-one beside it) for σ, q, T, δ; or σ for a target ε; or, with
        --config, a plan per hospital; or, with --run, what each hospital of a run reported spending."""
        if ctx.invoked_subcommand:
            return
        if run is not None:
            if config is not None or noise_multiplier is not None or target_epsilon is not None:
                raise UserError("--run prints what a run's hospitals spent; give it alone")
            _from_run(run)
            return
        if config is not None:
            if noise_multiplier is not None or target_epsilon is not None or sample_rate is not None:
                raise UserError("--config takes its σ, ε and q from the configuration; drop the other options "
                                "or override them with --set privacy.target_epsilon=…")
            _from_config(config, set_ or [])
            return
        if set_:
            raise UserError("--set needs --config FILE")
        _single(noise_multiplier, target_epsilon, sample_rate, steps, delta)

    @privacy_app.command("keygen")
    def keygen(path: Annotated[Path, typer.Argument(help="Key file to create (32 random bytes, mode 0600).")]) -> None:
        """Create a key file for encrypting checkpoints at rest."""
        from medsyngan.sealed import generate_key_file

        generate_key_file(path)
        typer.echo(f"wrote {path} (keep it apart from the checkpoints it protects)")
