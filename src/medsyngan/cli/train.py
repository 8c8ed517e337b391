"""`medsyngan train` and `medsyngan generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medsyngan.cli.options import ConfigOption, KeyOption, SetOption, read_key
from medsyngan.errors import UserError


def _training_config(config: str | None, overrides: list[str], data: str | None, steps: int | None,
                     rounds: int | None, out: Path, resume: bool):
    from medsyngan.config import load_config
    from medsyngan.rundir import RunDir

    extra = list(overrides)
    if data is not None:
        extra += ['data.source="prepared"', f"data.path={_toml_string(str(Path(data).resolve()))}"]
    if rounds is not None:
        extra.append(f"federated.rounds={rounds}")
    if config is None:
        if not resume:
            raise UserError("no --config given; pass a preset (e.g. --config dcgan64) or a TOML file")
        # Resuming without --config continues the run's own configuration (plus any --set/--steps).
        saved = RunDir(out).config_path
        if not saved.is_file():
            raise UserError(f"{out} has no config.toml to resume from; pass --config or the right --out")
        config = str(saved)
    cfg = load_config(config, extra)
    if steps is not None:
        if steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}")
        # A resumed run's saved configuration already holds the first run's cap; --steps is then the new total.
        cfg.train.steps = steps if resume else min(cfg.train.steps, steps)
    if cfg.privacy.checkpoint_key:
        # Absolute in the run's config.toml, so that generate/evaluate find the key from any directory.
        cfg.privacy.checkpoint_key = str(Path(cfg.privacy.checkpoint_key).expanduser().resolve())
        read_key(Path(cfg.privacy.checkpoint_key))  # a missing key file fails before the run directory is made
    return cfg


def _toml_string(text: str) -> str:
    import json

    return json.dumps(text)  # a JSON string literal is a valid TOML basic string


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (created; holds checkpoints, samples).")],
        config: ConfigOption = None,
        set_: SetOption = None,
        data: Annotated[Optional[str], typer.Option("--data", help="Prepared dataset directory (sets data.source=prepared).")] = None,
        steps: Annotated[Optional[int], typer.Option("--steps", help="Cap train.steps (quick trials); with --resume, the total to reach.")] = None,
        rounds: Annotated[Optional[int], typer.Option("--rounds", help="Set federated.rounds.")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")] = False,
    ) -> None:
        """Train a GAN: centralized, or federated across hospitals when federated.enabled is set."""
        from medsyngan.rundir import RunDir, log

        cfg = _training_config(config, set_ or [], data, steps, rounds, out, resume)
        from medsyngan.workflows import train as run_training

        run_dir = RunDir(out).create(cfg, resume=resume)
        summary = run_training(cfg, run_dir, resume)
        if cfg.federated.enabled:
            return
        state = "stopped" if summary["interrupted"] else "finished"
        log.info("%s at step %d (%.1f kimg); run directory %s", state, summary["step"], summary["kimg"], out)
        if summary["interrupted"]:
            import sys

            # 130 like a shell's Ctrl-C, so scripts see the run did not finish (typer.Exit's code is dropped by
            # the non-standalone CLI entry point).
            sys.exit(130)

    @app.command()
    def generate(
        out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the generated files.")],
        run: Annotated[Optional[Path], typer.Option("--run", help="Run directory (its latest checkpoint).")] = None,
        checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Checkpoint folder or model.safetensors file.")] = None,
        count: Annotated[int, typer.Option("--count", "-n", help="Number of images.")] = 16,
        fmt: Annotated[str, typer.Option("--format", help="png or dicom.")] = "png",
        truncation: Annotated[float, typer.Option("--truncation", help="StyleGAN2 truncation psi (1: none).")] = 1.0,
        seed: Annotated[int, typer.Option("--seed", help="Latent seed.")] = 0,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 64,
        key: KeyOption = None,
        label: Annotated[Optional[list[str]], typer.Option(
            "--label", help="Conditional models: a finding (repeat, or 'A|B', for several; 'No Finding': none).")] = None,
        view: Annotated[Optional[str], typer.Option("--view", help="Conditional models: PA or AP.")] = None,
        sex: Annotated[Optional[str], typer.Option("--sex", help="Conditional models: F or M.")] = None,
        age: Annotated[Optional[str], typer.Option("--age", help="Conditional models: age band 0-17, 18-39, 40-59, 60+.")] = None,
    ) -> None:
        """Generate synthetic images (PNG, or DICOM marked SYNTHETIC) from a trained generator; a conditional model
        generates the labels asked for (the others drawn from the frequencies it was trained with)."""
        from medsyngan.rundir import console
        from medsyngan.runtime import select_device
        from medsyngan.training.generate import (generate_images, label_layout, load_generator, request_labels,
                                                 write_dicom, write_png)

        if (run is None) == (checkpoint is None):
            raise UserError("pass exactly one of --run RUN_DIR or --checkpoint FILE")
        if fmt not in ("png", "dicom"):
            raise UserError(f"--format must be png or dicom, not '{fmt}'")
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        if count < 1:
            raise UserError(f"--count must be at least 1, got {count}")
        device = select_device("auto")
        G, meta = load_generator(run if run is not None else checkpoint, device, read_key(key))
        layout = label_layout(G)
        fixed = layout.request(label, view, sex, age)
        labels = request_labels(G, count, seed, fixed) if layout.groups else None
        images = generate_images(G, count, seed, truncation, batch_size, device, labels=labels)
        decoded = [layout.decode(c) for c in labels] if labels is not None else None
        paths = (write_png(images, out, labels=decoded) if fmt == "png"
                 else write_dicom(images, out, meta, labels=decoded))
        asked = ""
        if fixed and decoded is not None:
            chosen = {g: v for g, v in decoded[0].items() if g in fixed}
            asked = " for " + ", ".join(("|".join(v) or "No Finding") if g == "findings" else v
                                        for g, v in chosen.items())
        console.print(f"wrote {len(paths)} {fmt} images ({images.shape[1]} px){asked} to {out} from "
                      f"{meta['checkpoint']}")
