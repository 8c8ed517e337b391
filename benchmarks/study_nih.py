"""Study: what federation and privacy cost in image quality on the real NIH chest X-ray sample.

One command reruns the whole study::

    .venv/bin/python benchmarks/study_nih.py [--quick] [--seeds 0 1] [--out runs/study-nih] [--docs docs]

The study is data: ``experiments/nih-64/study.toml`` (the data split, the budget, the rows in order, the seeds,
the targets), one recipe file per row beside it, and ``tuning.toml`` (named variants of the rows). ``--study DIR``
runs another study folder the same way (``experiments/nih-64-eps``: the ε sweep, scored with utility). This
script runs them:

1. Data: the 64-px NIH sample (``../shared/data/nih-chestxray14``, or ``$MEDSYNGAN_NIH_DIR``) is prepared once
   (or, for a study with ``films = "covid-cxr"``, the public COVID-19 films at the study's ``size``); a fixed
   fraction of its patients become the evaluation set, the rest the training set — two prepared datasets,
   patient-disjoint. Nothing looks at the evaluation set until the final scoring.
2. Every row at every seed trains through the runner (``medsyngan.workflows.train``) for the budget's images
   through D, after the run it starts from (the public phantom model for rows 1w–5w).
3. Every run is scored by ``evaluate_run`` against the evaluation patients and the training set; ε spent, bytes
   the hospitals sent and wall time come from the run's own log.

Outputs: ``OUT/study.json`` and ``OUT/study.md`` (with ``--docs DIR`` also ``DIR/results/<name>.json`` and one
sample grid PNG per row in ``DIR/results/``, ``<name>`` being study.toml's ``name``; a study with ``utility = true``
adds its utility table to study.md, and one with a ``[sweep]`` its plot, ``OUT/<figure>`` and
``DIR/results/<figure>``). ``run(quick)`` returns the figures for ``make bench``. ``--tune
[--variant NAME…]`` trains tuning variants (and rows, by name) on the tuning patients — a validation split of the
training patients, or of the donated tuning set that no row trains on (``[tuning_split] donated_fraction``) — and
writes ``OUT/tuning.json`` / ``OUT/tuning.md`` (validation scores only); ``--collect`` merges tuning folders;
``--tune --diagnose`` scores the public model with the tuning-train films' low-order statistics put in place of its
own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import run_all  # noqa: E402  (the one machine description of every benchmark)
from study_tables import fd_by_seed, markdown, pick, summarize, targets, tuning_markdown  # noqa: E402
from study_utility import per_label_markdown, sweep_png, utility_markdown  # noqa: E402

from medsyngan.data.shared import nih_sample_dir as nih_dir  # noqa: E402
from medsyngan.workflows.experiment import ExperimentFolder, PlannedRun, Workspace, load_experiment  # noqa: E402

EXPERIMENT = REPO / "experiments" / "nih-64"
GRID = 36
RESULT_FILE = "study-result.json"
TUNING_RESULT_FILE = "tuning-result.json"


def prepare_split(exp: ExperimentFolder, work: Path) -> tuple[Path, Path, dict[str, int]]:
    """(the rows' training dataset, evaluation dataset, counts) under ``work``; patient-disjoint. With a donated
    tuning set (``[tuning_split] donated_fraction``) the rows train on the study's training patients without it."""
    from medsyngan.data.api import covid_dataset
    from medsyngan.data.prepare import PrepareSettings, prepare
    from medsyngan.data.prepared import PreparedDataset
    from medsyngan.workflows.split import split_patients

    if exp.study.films == "covid-cxr":
        films = covid_dataset(exp.study.size)
    else:
        source = nih_dir()
        prepare(source, work / "nih-64", PrepareSettings(size=64, skip_bad=True), images_dir=source / "images-64")
        films = PreparedDataset.open(work / "nih-64")
    split = exp.study.split
    counts = split_patients(films, split.holdout_fraction, split.seed, work / "train", work / "eval",
                            ("train", "eval"))
    tuning = exp.study.tuning_split
    if tuning.donated_fraction is None:
        return work / "train", work / "eval", counts
    counts |= split_patients(PreparedDataset.open(work / "train"), tuning.donated_fraction, tuning.seed,
                             work / "private", work / "donated", ("private", "donated"))
    return work / "private", work / "eval", counts


def tuning_split(exp: ExperimentFolder, out: Path):
    """(the rows' training folder, tuning-train, validation): the tuning patients — the donated tuning set, else
    the rows' own training patients — split again."""
    from medsyngan.data.prepared import PreparedDataset
    from medsyngan.workflows.split import split_patients

    train_dir, _, _ = prepare_split(exp, out / "data")
    split = exp.study.tuning_split
    tuning = out / "data" / "donated" if split.donated_fraction is not None else train_dir
    split_patients(PreparedDataset.open(tuning), split.holdout_fraction, split.seed, out / "data" / "tune-train",
                   out / "data" / "val", ("tune-train", "val"))
    return train_dir, PreparedDataset.open(out / "data" / "tune-train"), PreparedDataset.open(out / "data" / "val")


def saved(path: Path, run: PlannedRun) -> dict[str, Any] | None:
    """A result file written for this very plan, without its plan."""
    if path.is_file():
        result = json.loads(path.read_text())
        if run.planned_as(result.pop("plan", None)):
            return result
    return None


def train_and_score(ws: Workspace, run: PlannedRun, reuse: bool, train, evaluation, metrics: str,
                    grid: Path | None, utility: bool | None = None) -> dict[str, Any]:
    """Train (or keep) the run and score it; a run on public data, or one that others start from, is kept
    whenever its recipe is unchanged, the others are retrained unless ``reuse``. ``utility``: score utility,
    detectability and re-identification (default: as the study says)."""
    from medsyngan.data.imageio import image_grid
    from medsyngan.rundir import RunDir
    from medsyngan.workflows.evaluation import evaluate_run, hospital_table

    retrain = not (reuse or run.public_data or run.name in ws.exp.dependencies())
    wall = ws.ensure(run, retrain=retrain)
    utility = ws.exp.study.utility if utility is None else utility
    scored = evaluate_run(run.folder, evaluation, train, metrics=metrics, utility=utility)
    if grid is not None:
        from PIL import Image

        grid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_grid(scored.images[:GRID], cols=6)).save(grid, optimize=True)
    rd = RunDir(run.folder)
    rows = rd.read_metrics()
    hospitals = hospital_table(rd) if run.cfg.federated.enabled else []
    return {
        "wall_s": wall, "metrics": scored.metrics, "skipped": scored.evaluation.skipped, "epsilon": scored.epsilon,
        "delta": scored.delta, "bytes_sent": sum(h["bytes_sent"] for h in hospitals), "hospitals": hospitals,
        "kimg": max((r.get("kimg", 0.0) for r in rows), default=0.0), "generator": scored.meta["generator_part"],
    }


def score_images(images: np.ndarray, train, evaluation, metrics: str, seed: int):
    """Scores of a set of images that no run generated (the phantoms themselves, the diagnosis' variants)."""
    from medsyngan.metrics import evaluate

    return evaluate(images, np.asarray(evaluation.images), np.asarray(train.images), metrics=metrics,
                    feature_extractor="random", real_patients=evaluation.patients, train_patients=train.patients,
                    msssim_pairs=500, seed=seed)


def score_phantoms(cfg, train, evaluation) -> dict[str, float]:
    """FD and KID of a public run's own training films (the phantoms, or the public COVID-19 films) against the
    evaluation set: how close the public data alone come to the hospitals' X-rays, before any GAN."""
    from medsyngan.data.api import load_training_data

    phantoms = np.asarray(load_training_data(cfg).images)
    chosen = np.random.default_rng(cfg.run.seed).permutation(len(phantoms))[: cfg.eval.num_samples]
    return score_images(phantoms[np.sort(chosen)], train, evaluation, "fd,kid", cfg.run.seed).metrics


def run_study(quick: bool, seeds: list[int], out: Path, docs: Path | None = None,
              only: list[str] | None = None, reuse: bool = False, scale: int = 1,
              experiment: Path = EXPERIMENT) -> dict[str, Any]:
    """``reuse`` keeps a finished run whose resolved recipe is unchanged (an interrupted study continues);
    ``scale`` multiplies the budget's images through D for every row (files in ``docs`` then carry an
    ``-x{scale}`` suffix beside the full-budget ones); ``experiment``: another study folder of the same form,
    whose files in ``docs`` are named after it."""
    from medsyngan.data.prepared import PreparedDataset
    from medsyngan.errors import UserError
    from medsyngan.rundir import atomic_write_text

    if scale < 1:
        raise UserError(f"--scale {scale}: the budget multiplier must be a whole number ≥ 1")
    exp = load_experiment(experiment)
    if exp.study.films == "nih" and not (nih_dir() / "images-64").is_dir():
        raise UserError(f"{nih_dir()}: NIH sample not found; set MEDSYNGAN_NIH_DIR to the nih-chestxray14 folder")
    budget = (exp.study.quick if quick else exp.study.budget).scaled(scale)
    tag = f"-x{scale}" if scale != 1 else ""
    only = only or (exp.study.quick_rows if quick else None)
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    train_dir, eval_dir, counts = prepare_split(exp, out / "data")
    train, evaluation = PreparedDataset.open(train_dir), PreparedDataset.open(eval_dir)
    ws = Workspace(exp, out, train_dir, budget)
    results: list[dict[str, Any]] = []
    for seed in seeds:
        for name in exp.study.rows:
            trainable = not only or name in only  # with --reuse, finished runs of the others are still reported
            run = ws.plan(name, seed)
            result = saved(run.folder / RESULT_FILE, run) if reuse else None
            if result is not None:
                print(f"[study] {name}, seed {seed}: reusing {run.folder / RESULT_FILE}", flush=True)
                results.append(result)
                continue
            if not trainable:
                continue
            grid = (docs / "results" / f"{exp.study.name}{tag}-{name}.png") if docs is not None and seed == seeds[0] else \
                out / "grids" / f"{name}-s{seed}.png"
            result = {"config": name, "label": exp.book[name].label, "seed": seed, "grid": str(grid),
                      **train_and_score(ws, run, reuse, train, evaluation, exp.study.metrics, grid)}
            if run.public_data:  # the public films themselves: phantoms, or the COVID-19 films
                key = "phantom_metrics" if run.cfg.data.source == "phantoms" else "public_film_metrics"
                result[key] = score_phantoms(run.cfg, train, evaluation)
            results.append(result)
            atomic_write_text(run.folder / RESULT_FILE, json.dumps(result | {"plan": run.plan}, default=str) + "\n")
            print(f"[study] {name} s{seed}: {result['wall_s']:.0f} s, FD {pick(result['metrics'], 'fd'):.4g}",
                  flush=True)
            atomic_write_text(out / "partial.json", json.dumps(results, indent=2, default=str) + "\n")
    summary = summarize(results, {name: exp.book[name].label for name in exp.study.rows})
    checks = targets(summary, exp.study, results)
    report = {
        "quick": quick, "scale": scale, "budget": budget.model_dump(),
        "split": counts | exp.study.split.model_dump(), "tuning_split": exp.study.tuning_split.model_dump(),
        "seeds": seeds,
        "machine": run_all.machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "study_wall_s": round(time.time() - start, 1), "summary": summary, "targets": checks, "runs": results,
    }
    text = json.dumps(report, indent=2, default=str) + "\n"
    atomic_write_text(out / "study.json", text)
    atomic_write_text(out / "study.md", markdown(summary, checks) + "\nFD by seed:\n\n"
                      + fd_by_seed(results, exp.study.rows) + utility_tables(exp, results))
    if docs is not None:
        atomic_write_text(docs / "results" / f"{exp.study.name}{tag}.json", text)
    sweep = exp.study.sweep
    if sweep is not None and results:
        title = f"{exp.study.name}{tag}: seed {seeds[0]}, {budget.images_through_d} images through D per row"
        first = [r for r in results if r["seed"] == seeds[0]]
        for folder in [out, *([docs / "results"] if docs is not None else [])]:
            sweep_png(first, sweep.rows, sweep.epsilons, folder / sweep.figure.replace(".png", f"{tag}.png"), title)
    return report


def utility_tables(exp: ExperimentFolder, results: list[dict[str, Any]]) -> str:
    """study.md's utility table and each row's per-label AUROC (first seed), for a study scored with utility."""
    if not exp.study.utility or not results:
        return ""
    first = [r for r in results if r["seed"] == results[0]["seed"]]
    parts = ["\nUtility, detectability and re-identification (seed "
             f"{results[0]['seed']}; 95 % intervals resample evaluation patients):\n\n",
             utility_markdown(first, exp.study.rows)]
    for run in first:
        if any(k.startswith("auroc_synth") for k in run["metrics"]):
            parts.append(f"\nPer label, {run['label']}:\n\n{per_label_markdown(run)}")
    return "".join(parts)


def run_tuning(out: Path, seed: int = 0, reuse: bool = False, only: list[str] | None = None,
               variants: list[str] | None = None, experiment: Path = EXPERIMENT) -> dict[str, Any]:
    """Train and score tuning variants (every one in tuning.toml unless ``variants`` names some, rows included)
    on the tuning split: trained on tuning-train, scored against validation only."""
    from medsyngan.rundir import atomic_write_text

    exp = load_experiment(experiment)
    _, tune_train, val = tuning_split(exp, out)
    ws = Workspace(exp, out, tune_train.root, exp.study.budget, runs="tuning")
    rows = []
    for name in variants or [v.name for v in exp.variants]:  # in the order asked for
        row_name = exp.book.chain(name)[0].name
        if only and row_name not in only:
            continue
        run = ws.plan(name, seed)
        result_path = out / "tuning" / f"{name}-s{seed}" / TUNING_RESULT_FILE
        result = saved(result_path, run) if reuse else None
        if result is None:
            print(f"[tune] {name}: {exp.book[name].question or exp.book[name].label}", flush=True)
            scored = train_and_score(ws, run, reuse, tune_train, val, exp.study.tuning_metrics,
                                     out / "tuning" / f"{name}-s{seed}.png", utility=False)
            if exp.study.utility:
                scored["metrics"] |= tuning_utility(run, tune_train, val, seed)
            result = {"config": row_name, "variant": name, "seed": seed, "wall_s": scored["wall_s"],
                      "epsilon": scored["epsilon"], "metrics": scored["metrics"]}
            atomic_write_text(result_path, json.dumps(result | {"plan": run.plan}, default=str) + "\n")
        rows.append(result)
        print(f"[tune] {name}: validation FD {pick(result['metrics'], 'fd'):.4g}", flush=True)
    report = {"seed": seed, "validation_patients": len(np.unique(val.patients)), "tune_train_images": len(tune_train),
              "validation_images": len(val), "rows": rows}
    atomic_write_text(out / "tuning.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(out / "tuning.md", tuning_markdown(rows))
    return report


def tuning_utility(run: PlannedRun, train, val, seed: int) -> dict[str, float]:
    """Tuning's utility: AUROC on the validation patients of the classifier trained on the run's labelled
    synthetic films alone, and their label fidelity read by a classifier trained on the tuning-train films (donated,
    so reading them costs no ε); the DP-SGD, detectability and re-identification references of the study's scoring
    cost minutes each and choose nothing."""
    from medsyngan.metrics.utility import utility_audit
    from medsyngan.training.generate import generate_images, load_generator
    from medsyngan.workflows.evaluation import generated_labels, label_matrix, latent_seed

    G = load_generator(run.folder)[0]
    count = run.cfg.eval.num_samples
    labels, names, matrix = generated_labels(G, count, latent_seed(seed))
    fake = generate_images(G, count, latent_seed(seed), labels=labels)
    real = label_matrix(val, "validation")[1]  # the same label columns: all come from binary_targets
    return utility_audit(fake, matrix, np.asarray(val.images), real, val.patients, names,
                         np.asarray(train.images), label_matrix(train, "tuning-train")[1], seed=seed).values()


def low_order_diagnosis(out: Path, seed: int = 0) -> dict[str, float]:
    """Validation FD of the public model (scored as ``--tune`` scores it) with low-order statistics of
    tuning-train put in place of its own: how much of its distance to real films is low-order. Also the 90 %
    quantile of tuning-train patients' k×k deviations from the model's mean image, as an RMS per pixel: where
    ``privacy.mean_image_clip`` would start to cut."""
    from medsyngan.privacy.moments import generator_mean, unit_means
    from medsyngan.training.generate import generate_images, load_generator
    from medsyngan.workflows.evaluation import latent_seed

    exp = load_experiment(EXPERIMENT)
    _, tune_train, val = tuning_split(exp, out)
    ws = Workspace(exp, out, tune_train.root, exp.study.budget, runs="tuning")
    public = ws.plan("public", seed)
    ws.ensure(public)
    G = load_generator(public.folder)[0]
    clip_quantiles = {
        f"clip 90% quantile at {k}×{k}": float(np.quantile(
            (unit_means(tune_train.images, tune_train.patients, k) - generator_mean(G, k)).flatten(1).norm(dim=1)
            / k, 0.9)) for k in (8, 16)}
    fake = generate_images(G, exp.study.budget.samples, seed=latent_seed(seed)).astype(float)
    real = np.asarray(tune_train.images, dtype=float)
    centred = fake - fake.mean(axis=0)
    ranks = np.argsort(np.argsort(fake, axis=None)) / (fake.size - 1)  # each pixel's quantile among all of them
    variants = {
        "as generated": fake,
        "mean image replaced by tuning-train's": centred + real.mean(axis=0),
        "grey-level histogram matched to tuning-train's":
            np.interp(ranks, np.linspace(0, 1, real.size), np.sort(real, axis=None)).reshape(fake.shape),
        "mean image and contrast matched": centred * (real.std() / fake.std()) + real.mean(axis=0),
    }
    return {f"validation FD, {name}": pick(score_images(np.clip(np.round(x), 0, 255).astype(np.uint8), tune_train,
                                                        val, "fd", seed).metrics, "fd")
            for name, x in variants.items()} | clip_quantiles


def collect_tuning(folders: list[Path], experiment: Path = EXPERIMENT) -> str:
    """One tuning table from the finished runs in several work folders (tuning runs made side by side in separate
    folders, so that their data preparation never races), in tuning.toml's order, then by seed."""
    from medsyngan.errors import UserError

    order = {name: n for n, name in enumerate(load_experiment(experiment).book.recipes)}
    rows = [json.loads(f.read_text()) for folder in folders
            for f in sorted((folder / "tuning").glob(f"*/{TUNING_RESULT_FILE}"))]
    if not rows:
        raise UserError(f"no finished tuning runs under {', '.join(map(str, folders))}; run --tune first")
    rows.sort(key=lambda r: (order.get(r["variant"], len(order)), r["seed"]))
    return tuning_markdown(rows)


def default_out(experiment: Path, quick: bool) -> Path:
    """runs/study-nih[-quick] for the NIH study, runs/study-<folder>[-quick] for another study folder."""
    name = "study-nih" if Path(experiment).resolve() == EXPERIMENT else f"study-{Path(experiment).name}"
    return REPO / "runs" / (f"{name}-quick" if quick else name)


def run(quick: bool) -> dict:
    """Entry point of ``make bench``: the study's headline figures."""
    report = run_study(quick, [0], default_out(EXPERIMENT, quick))
    return {"summary": report["summary"], "targets": report["targets"], "study_wall_s": report["study_wall_s"]}


def main(argv: list[str] | None = None) -> int:
    from medsyngan.errors import UserError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized smoke run (study.toml's quick budget)")
    parser.add_argument("--study", type=Path, default=EXPERIMENT, metavar="DIR",
                        help="the study folder (default experiments/nih-64; e.g. experiments/nih-64-families, "
                        "experiments/nih-64-eps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: study.toml's seeds")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default runs/study-nih[-quick])")
    parser.add_argument("--docs", type=Path, default=None, help="also write study.json and sample grids here")
    parser.add_argument("--only", nargs="+", metavar="ROW",
                        help="train only these rows (with --reuse, finished runs of the others are still reported)")
    parser.add_argument("--scale", type=int, default=1, metavar="K",
                        help="K times the budget's images through D for every row")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs whose recipe is unchanged")
    parser.add_argument("--tune", action="store_true",
                        help="run tuning variants on a validation split of the tuning patients instead")
    parser.add_argument("--variant", nargs="+", metavar="NAME",
                        help="with --tune: only these variants of tuning.toml (or rows), in this order")
    parser.add_argument("--collect", type=Path, nargs="+", metavar="OUT",
                        help="print one tuning table from the finished tuning runs in these work folders")
    parser.add_argument("--diagnose", action="store_true",
                        help="with --tune: validation FD of the public model with tuning-train's mean image, "
                        "histogram or contrast put in place of its own, and where a mean-image clip would cut")
    args = parser.parse_args(argv)
    out = args.out or default_out(args.study, args.quick)
    try:
        exp = load_experiment(args.study)
        seeds = args.seeds or exp.study.seeds
        for name in [*(args.only or []), *(args.variant or [])]:
            exp.book[name]  # an unknown name fails here, listing the known ones
        if args.collect:
            print(collect_tuning(args.collect, args.study), end="")
            return 0
        if (args.diagnose or args.variant) and not args.tune:
            raise UserError("--diagnose and --variant work on a tuning folder; add --tune")
        if args.diagnose:
            for name, value in low_order_diagnosis(out, seeds[0]).items():
                print(f"{name}: {value:.3f}")
            return 0
        if args.tune:
            run_tuning(out, seeds[0], args.reuse, only=args.only, variants=args.variant, experiment=args.study)
            print((out / "tuning.md").read_text())
            return 0
        report = run_study(args.quick, seeds, out, args.docs, args.only, args.reuse, args.scale, args.study)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(report["summary"], report["targets"]))
    print(f"study finished in {report['study_wall_s']:.0f} s; {out / 'study.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
