"""`medsyngan evaluate`: metrics.json and report.html for a run, a checkpoint or a folder of synthetic images.

A run is scored by :func:`medsyngan.workflows.evaluation.evaluate_run`, the same function the demo and the study
use; a checkpoint or a folder of images by the same metrics and seed rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medsyngan.cli.options import ConfigOption, KeyOption, SetOption, read_key
from medsyngan.errors import UserError


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
        seed: Annotated[Optional[int], typer.Option("--seed", help="Evaluation seed (default: the run's run.seed): random subsets use it, generated latents it + 1000.")] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 64,
        utility: Annotated[bool, typer.Option("--utility", help="Also train-synthetic-test-real utility (per-label AUROC beside real-trained and DP-SGD classifiers), detectability and the re-identification audit; needs --run of a class-conditional model and prepared --real/--train sets.")] = False,
        config: ConfigOption = None,
        overrides: SetOption = None,
        key: KeyOption = None,
    ) -> None:
        """Evaluate synthetic images: FD/FID, KID, precision/recall, density/coverage, nearest-neighbour SSIM/PSNR/MSE,
        MS-SSIM diversity, detectability, PPL and a privacy audit (with --utility also train-synthetic-test-real
        utility and re-identification); writes metrics.json and a self-contained report.html."""
        import json

        from medsyngan.config import config_from_toml_text, load_config
        from medsyngan.metrics.evaluate import evaluate, evaluate_snapshots
        from medsyngan.metrics.features import make_extractor
        from medsyngan.metrics.images import load_image_set
        from medsyngan.report.html import write_report
        from medsyngan.rundir import RunDir, atomic_write_text, console, setup_logging
        from medsyngan.runtime import configure_threads, select_device
        from medsyngan.training.checkpoint import snapshot_dirs
        from medsyngan.workflows.evaluation import (evaluate_run, latent_seed, load_attack_discriminator,
                                                    require_some_metric)

        sources = [s for s in (run, checkpoint, fake) if s is not None]
        if len(sources) != 1:
            raise UserError("give exactly one of --run RUN_DIR, --checkpoint FILE or --fake DIR")
        if utility and run is None:
            raise UserError("--utility scores the labelled films of a conditional run; give --run RUN_DIR")
        setup_logging()
        if run is not None and config is None:
            RunDir(run).load_config()  # a clear error when --run is not a run directory
            config = str(RunDir(run).config_path)
        cfg = load_config(config, overrides)
        configure_threads(cfg.run.threads)
        device = select_device(cfg.run.device)
        metrics = metrics or cfg.eval.metrics
        nn_threshold = cfg.eval.nn_threshold if nn_threshold is None else nn_threshold
        count = count or cfg.eval.num_samples
        checkpoint_key = read_key(key)

        real_set = load_image_set(real, "--real")
        train_set = load_image_set(train, "--train") if train is not None else None
        try:
            extractor = make_extractor(feature_extractor or cfg.eval.feature_extractor, device)
        except UserError:
            extractor = None  # evaluate() meets the same error and records the feature metrics as not computed
        features = extractor if extractor is not None else feature_extractor or cfg.eval.feature_extractor
        run_rows, snapshot_rows = [], []
        if run is not None:
            scored = evaluate_run(
                run, real_set, train_set, metrics=metrics, feature_extractor=features, num_samples=count, seed=seed,
                epsilon=epsilon, delta=delta, nn_threshold=nn_threshold, attack_discriminator=True, msssim_pairs=1000, ppl_samples=ppl_samples,
                out=out, key=checkpoint_key, device=device, batch_size=batch_size, utility=utility,
            )
            ev, fake_images, notes = scored.evaluation, scored.images, scored.notes
            epsilon, delta, seed = scored.epsilon, scored.delta, scored.seed
            run_rows = RunDir(run).read_metrics()
            snaps = snapshot_dirs(Path(run) / "checkpoints")
            if extractor is not None and snapshot_count > 0 and len(snaps) > 1:
                snapshot_rows = evaluate_snapshots(snaps, real_set.images, extractor, snapshot_count, seed,
                                                   batch_size, device, checkpoint_key)
        else:
            generator, discriminator, notes = None, None, []
            if fake is not None:
                seed = cfg.run.seed if seed is None else seed
                fake_images = load_image_set(fake, "--fake").images
            else:
                from medsyngan.training.generate import generate_images, load_generator

                generator, meta = load_generator(checkpoint, device, checkpoint_key)
                if seed is None:  # the checkpoint's own run.seed, as for a run
                    seed = config_from_toml_text(meta["config_toml"], str(checkpoint)).run.seed
                fake_images = generate_images(generator, count, latent_seed(seed), batch_size=batch_size,
                                              device=device)
                discriminator = load_attack_discriminator(Path(meta["checkpoint"]), device, checkpoint_key)
                notes.append(f"synthetic images: {count} from {meta['checkpoint']}, latent seed {latent_seed(seed)}")
            ev = evaluate(
                fake_images, real_set.images, None if train_set is None else train_set.images,
                metrics=metrics, feature_extractor=features, generator=generator, discriminator=discriminator,
                epsilon=epsilon, delta=delta, real_patients=real_set.patients,
                train_patients=None if train_set is None else train_set.patients, nn_threshold=nn_threshold,
                ppl_samples=ppl_samples, batch_size=batch_size, seed=seed, device=device,
            )
            require_some_metric(ev)
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
                 "near_copy": bool(ev.nn.ssim[i] > ev.nn_threshold)} for i in order
            ]
        atomic_write_text(out / "evaluation.json", json.dumps(details, indent=2, default=str) + "\n")
        report = write_report(
            out / "report.html", ev, fake_images, None if train_set is None else train_set.images,
            run_rows=run_rows, snapshot_rows=snapshot_rows, notes=notes,
            title=f"MedSynGAN evaluation — {cfg.run.name if run is not None else sources[0].name}",
        )

        from rich.table import Table

        table = Table(title="evaluation")
        table.add_column("metric", no_wrap=True)
        table.add_column("value", justify="right")
        for name, value in ev.metrics.items():
            table.add_row(name, f"{value:.5g}")
        console.print(table)
        console.print(f"wrote {out / 'metrics.json'} and {report}")
        if ev.failed:
            raise UserError(
                "not computed: " + "; ".join(f"{g} ({r})" for g, r in ev.failed.items())
                + f" — the other metrics are in {out / 'metrics.json'}"
            )
