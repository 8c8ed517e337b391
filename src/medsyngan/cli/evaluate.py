"""`medsyngan evaluate`: metrics.json and report.html for a run, a checkpoint or a folder of synthetic images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medsyngan.cli.options import ConfigOption, KeyOption, SetOption, read_key
from medsyngan.errors import UserError


def _load_discriminator(checkpoint: Path, device, key: bytes | None):
    """The run's discriminator for the LOGAN attack, or None (with the reason logged) when it cannot be built."""
    import logging

    from medsyngan.models.registry import build_discriminator
    from medsyngan.training.checkpoint import load_checkpoint

    try:
        ckpt = load_checkpoint(checkpoint, key)
        D = build_discriminator(ckpt.config().model)
        state = {k.removeprefix("_module."): v for k, v in ckpt.part("D").items()}
        if not state:
            raise UserError("the checkpoint holds no discriminator")
        D.load_state_dict(state)
        return D.to(device).eval().requires_grad_(False)
    except (UserError, RuntimeError) as exc:
        logging.getLogger("medsyngan").warning("LOGAN attack skipped: %s", str(exc).splitlines()[0])
        return None


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        real: Annotated[Path, typer.Option("--real", help="Real reference images the model did not train on "
                                           "(prepared dataset or folder of PNGs); the holdout of the privacy audit.")],
        out: Annotated[Path, typer.Option("--out", help="Folder for metrics.json, evaluation.json and report.html.")],
        run: Annotated[Optional[Path], typer.Option("--run", help="Run directory: latest checkpoint, every snapshot, metrics.jsonl.")] = None,
        checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="One checkpoint folder or .safetensors file.")] = None,
        fake: Annotated[Optional[Path], typer.Option("--fake", help="Folder of synthetic images (or a prepared dataset).")] = None,
        train: Annotated[Optional[Path], typer.Option("--train", help="Training images, for the memorization and membership audits.")] = None,
        metrics: Annotated[Optional[str], typer.Option("--metrics", help="'default' (no download), 'all', or a list of: fd,kid,prdc,nn,msssim,privacy,ppl,ppl_randomfeat.")] = None,
        feature_extractor: Annotated[Optional[str], typer.Option("--feature-extractor", help="inception | random | PATH of a TorchScript module.")] = None,
        count: Annotated[Optional[int], typer.Option("--count", help="Synthetic images to generate from a generator (default eval.num_samples).")] = None,
        snapshot_count: Annotated[int, typer.Option("--snapshot-count", help="Images per snapshot for the curves over training (0: no curves).")] = 500,
        nn_threshold: Annotated[Optional[float], typer.Option("--nn-threshold", help="SSIM above which a synthetic image is flagged as a near-copy.")] = None,
        epsilon: Annotated[Optional[float], typer.Option("--epsilon", help="ε of the run, for the membership-inference bound (default: from the run's log).")] = None,
        delta: Annotated[Optional[float], typer.Option("--delta", help="δ of the run (default: from the run's log, else 0).")] = None,
        ppl_samples: Annotated[int, typer.Option("--ppl-samples", help="Latent pairs for PPL (at least 100).")] = 2000,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the generated latents and of every random subset.")] = 0,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 64,
        config: ConfigOption = None,
        overrides: SetOption = None,
        key: KeyOption = None,
    ) -> None:
        """Evaluate synthetic images: FD/FID, KID, precision/recall, density/coverage, nearest-neighbour SSIM/PSNR/MSE,
        MS-SSIM diversity, PPL and a privacy audit; writes metrics.json and a self-contained report.html."""
        import json

        from medsyngan.config import load_config
        from medsyngan.metrics.evaluate import evaluate, evaluate_snapshots, privacy_from_rows
        from medsyngan.metrics.features import make_extractor
        from medsyngan.metrics.images import load_image_set
        from medsyngan.report.html import write_report
        from medsyngan.rundir import RunDir, atomic_write_text, console, setup_logging
        from medsyngan.runtime import configure_threads, select_device
        from medsyngan.training.checkpoint import snapshot_dirs

        sources = [s for s in (run, checkpoint, fake) if s is not None]
        if len(sources) != 1:
            raise UserError("give exactly one of --run RUN_DIR, --checkpoint FILE or --fake DIR")
        setup_logging()
        if run is not None and config is None:
            RunDir(run).load_config()  # a clear error when --run is not a run directory
            config = str(RunDir(run).config_path)
        cfg = load_config(config, overrides)
        configure_threads(cfg.run.threads)
        device = select_device(cfg.run.device)
        metrics = metrics or cfg.eval.metrics
        feature_extractor = feature_extractor or cfg.eval.feature_extractor
        nn_threshold = cfg.eval.nn_threshold if nn_threshold is None else nn_threshold
        count = count or cfg.eval.num_samples
        checkpoint_key = read_key(key)

        real_set = load_image_set(real, "--real")
        train_set = load_image_set(train, "--train") if train is not None else None
        generator, discriminator, run_rows, notes = None, None, [], []
        if fake is not None:
            fake_images = load_image_set(fake, "--fake").images
        else:
            from medsyngan.training.generate import generate_images, load_generator

            source = run if run is not None else checkpoint
            generator, meta = load_generator(source, device, checkpoint_key)
            fake_images = generate_images(generator, count, seed, batch_size=batch_size, device=device)
            discriminator = _load_discriminator(Path(meta.get("checkpoint", source)), device, checkpoint_key)
            notes.append(f"synthetic images: {count} generated from {meta.get('checkpoint', source)} with seed {seed}")
        if run is not None:
            run_rows = RunDir(run).read_metrics()
            logged_eps, logged_delta = privacy_from_rows(run_rows)
            epsilon = logged_eps if epsilon is None else epsilon
            delta = logged_delta if delta is None else delta

        try:
            extractor = make_extractor(feature_extractor, device)
        except UserError:
            extractor = None  # evaluate() meets the same error and records the feature metrics as not computed
        ev = evaluate(
            fake_images, real_set.images, None if train_set is None else train_set.images,
            metrics=metrics, feature_extractor=extractor if extractor is not None else feature_extractor,
            generator=generator, discriminator=discriminator, epsilon=epsilon, delta=delta,
            real_patients=real_set.patients, train_patients=None if train_set is None else train_set.patients,
            nn_threshold=nn_threshold, ppl_samples=ppl_samples, batch_size=batch_size, seed=seed, device=device,
        )
        snapshot_rows = []
        if run is not None and extractor is not None and snapshot_count > 0:
            snaps = snapshot_dirs(RunDir(run).checkpoints)
            if len(snaps) > 1:
                snapshot_rows = evaluate_snapshots(snaps, real_set.images, extractor, snapshot_count, seed, batch_size,
                                                   device, checkpoint_key)

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", json.dumps(ev.metrics, indent=2) + "\n")
        details = {
            "protocol": ev.protocol, "skipped": ev.skipped, "snapshots": snapshot_rows,
            "sources": {"real": str(real), "train": str(train) if train else None,
                        "synthetic": str(sources[0]), "epsilon": epsilon, "delta": delta},
        }
        if ev.nn is not None:
            order = [int(i) for i in (-ev.nn.ssim).argsort()[:100]]
            details["closest_synthetic"] = [
                {"synthetic": i, "train": int(ev.nn.ssim_index[i]), "ssim": float(ev.nn.ssim[i]),
                 "near_copy": bool(ev.nn.ssim[i] > nn_threshold)} for i in order
            ]
        atomic_write_text(out / "evaluation.json", json.dumps(details, indent=2, default=str) + "\n")
        report = write_report(
            out / "report.html", ev, fake_images, None if train_set is None else train_set.images,
            run_rows=run_rows, snapshot_rows=snapshot_rows, notes=notes,
            title=f"MedSynGAN evaluation — {cfg.run.name if run is not None else sources[0].name}",
        )

        from rich.table import Table

        table = Table(title="evaluation")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in ev.metrics.items():
            table.add_row(key, f"{value:.5g}")
        console.print(table)
        console.print(f"wrote {out / 'metrics.json'} and {report}")
        if ev.failed:
            raise UserError(
                "not computed: " + "; ".join(f"{g} ({r})" for g, r in ev.failed.items())
                + f" — the other metrics are in {out / 'metrics.json'}"
            )
