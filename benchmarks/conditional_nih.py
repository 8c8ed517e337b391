"""Proof that class-conditional generation works on real chest X-rays: a conditional DCGAN trained on the NIH sample
draws films that a classifier of real films tells apart by the label they were asked for.

    .venv/bin/python benchmarks/conditional_nih.py [--out runs/conditional-nih] [--images 38400] [--width 24]
                                                   [--samples 200] [--judge-steps 800] [--quick]

1. Data: the 64-px NIH sample (``../shared/data/nih-chestxray14``, or ``$MEDSYNGAN_NIH_DIR``) prepared once and
   split patient-disjoint exactly as the NIH study splits it (``experiments/nih-64/study.toml`` [split]): the
   evaluation patients are never trained on.
2. A DCGAN conditioned on every label group (findings, view, sex, age band) trains on the training patients through
   ``medsyngan.workflows.train`` for ``--images`` real images through D, with the NIH study's centralized recipe
   (``experiments/nih-64/centralized.toml`` and its ``every_row``: batch 16, Adam 3e-4, the GroupNorm
   discriminator, generator EMA of 1 kimg); generated labels follow the training data's own label frequencies (a
   run without DP).
3. A judge per attribute — view PA vs AP, sex F vs M, any finding vs none — is the small CNN of
   ``medsyngan.metrics.classifier`` trained on the real training films; its balanced accuracy and AUROC on the real
   evaluation films say how well the attribute can be read from a 64-px film at all. ``--judges`` judges (one per
   seed) score everything; the table gives their mean and range.
4. For each attribute the generator (its EMA) makes ``--samples`` films per value from the same latents, the other
   label groups drawn from the training frequencies given that value; the judge's balanced accuracy (predicted
   value = asked value) and AUROC between the two sets say whether the films show what was asked. A generator that
   ignored its labels would score 0.5 on both.

Prints the table and writes ``OUT/conditional.json`` and ``OUT/conditional-samples.png`` (rows: PA, AP, F, M;
each pair of rows from the same latents); ``--docs DIR`` also copies both to ``DIR/results/``. ``--quick`` is a
smoke run of a few steps (figures meaningless).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import run_all  # noqa: E402  (the one machine description of every benchmark)

EXPERIMENT = REPO / "experiments" / "nih-64"
CONDITION = ["findings", "view", "sex", "age"]


def prepare_split(work: Path) -> tuple[Path, Path]:
    """(training dataset, evaluation dataset) under ``work``: the NIH study's patient-disjoint split."""
    from medsyngan.data.prepare import PrepareSettings, prepare
    from medsyngan.data.prepared import PreparedDataset
    from medsyngan.data.shared import nih_sample_dir
    from medsyngan.workflows.experiment import load_experiment
    from medsyngan.workflows.split import split_patients

    source = nih_sample_dir()
    prepare(source, work / "nih-64", PrepareSettings(size=64, skip_bad=True), images_dir=source / "images-64")
    split = load_experiment(EXPERIMENT).study.split
    split_patients(PreparedDataset.open(work / "nih-64"), split.holdout_fraction, split.seed, work / "train",
                   work / "eval", ("train", "eval"))
    return work / "train", work / "eval"


def train_model(train_dir: Path, run: Path, images: int, width: int, batch: int) -> float:
    """Train the conditional DCGAN (kept when a finished run of the same plan is there); training seconds."""
    from medsyngan.config import load_config
    from medsyngan.rundir import RunDir
    from medsyngan.workflows import train

    steps = max(1, images // batch)
    cfg = load_config("dcgan64", [
        'data.source="prepared"', f"data.path={json.dumps(str(train_dir))}", f"model.ngf={width}",
        f"model.ndf={width}", f"model.condition={json.dumps(CONDITION)}", f"train.batch_size={batch}",
        "train.lr_g=3e-4", "train.lr_d=3e-4", "model.dp_compatible=true",
        f"train.steps={steps}", "train.ema_kimg=1.0", f"train.checkpoint_every={steps}",
        f"train.sample_every={steps}", f"train.log_every={max(1, steps // 20)}", "run.threads=1",
        'run.name="conditional-nih"'])
    plan = cfg.to_toml()
    marker = run / "trained.json"
    if marker.is_file() and json.loads(marker.read_text())["plan"] == plan:
        return float(json.loads(marker.read_text())["wall_s"])
    start = time.time()
    train(cfg, RunDir(run).create(cfg))
    wall = round(time.time() - start, 1)
    marker.write_text(json.dumps({"plan": plan, "wall_s": wall}) + "\n")
    return wall


def _targets(ds, attribute: str) -> tuple[np.ndarray, np.ndarray]:
    """(class per film, which films have a known value) for 'view' (PA 0, AP 1), 'sex' (F 0, M 1), 'finding'."""
    if attribute == "view":
        views = np.char.upper(ds.views.astype(str))
        return (views == "AP").astype(int), np.isin(views, ["PA", "AP"])
    if attribute == "sex":
        return (ds.sexes == "M").astype(int), np.isin(ds.sexes, ["F", "M"])
    return np.array([int(bool(f)) for f in ds.labels]), np.ones(len(ds), bool)


def _asked_labels(G, attribute: str, value: int, count: int, seed: int) -> torch.Tensor:
    """Labels for ``count`` films of one attribute value, the other groups drawn given it from the run's frequencies."""
    from medsyngan.data.labels import JointLabels
    from medsyngan.training.generate import label_layout, request_labels

    layout = label_layout(G)
    if attribute == "view":
        return request_labels(G, count, seed, layout.request(view=("PA", "AP")[value]))
    if attribute == "sex":
        return request_labels(G, count, seed, layout.request(sex=("F", "M")[value]))
    if value == 0:
        return request_labels(G, count, seed, layout.request(findings=["No Finding"]))
    table: JointLabels = G.label_distribution
    with_finding = table.rows[:, layout.slices["findings"]].any(axis=1)
    some = JointLabels(layout, table.rows[with_finding], table.weights[with_finding])
    return some.sample(count, torch.Generator().manual_seed(seed))


def score(run: Path, train_dir: Path, eval_dir: Path, samples: int, judge_steps: int,
          judge_seeds: tuple[int, ...] = (0, 1, 2)) -> list[dict]:
    """Per attribute: each judge's scores on the real evaluation films and on the conditional samples, and their
    means over the judges (one per seed: the spread between them is part of the figure)."""
    from medsyngan.data.prepared import PreparedDataset
    from medsyngan.metrics.auroc import auroc, balanced_accuracy
    from medsyngan.metrics.classifier import ClassifierSettings, predict, train_classifier
    from medsyngan.training.generate import generate_images, load_generator

    train_ds, eval_ds = PreparedDataset.open(train_dir), PreparedDataset.open(eval_dir)
    G, _ = load_generator(run)
    rows = []
    for attribute in ("view", "sex", "finding"):
        y_train, known = _targets(train_ds, attribute)
        y_eval, known_eval = _targets(eval_ds, attribute)
        fake = np.concatenate([generate_images(G, samples, seed=7, labels=_asked_labels(G, attribute, v, samples, v))
                               for v in (0, 1)])
        asked = np.repeat([0, 1], samples)
        judges = []
        for seed in judge_seeds:
            judge = train_classifier(np.asarray(train_ds.images)[known], y_train[known][:, None],
                                     ClassifierSettings(epochs=0, min_steps=judge_steps), seed)
            real = predict(judge, np.asarray(eval_ds.images)[known_eval])[:, 0]
            probs = predict(judge, fake)[:, 0]
            prevalence = float(y_train[known].mean())  # the threshold that makes a rare class count
            judges.append({"seed": seed,
                           "real_balanced_accuracy": balanced_accuracy(real, y_eval[known_eval], prevalence),
                           "real_auroc": auroc(real, y_eval[known_eval]),
                           "generated_balanced_accuracy": balanced_accuracy(probs, asked, prevalence),
                           "generated_auroc": auroc(probs, asked)})
        row = {"attribute": attribute, "eval_films": int(known_eval.sum()),
               "eval_positive": int(y_eval[known_eval].sum()), "generated_per_value": samples, "judges": judges}
        for key in ("real_balanced_accuracy", "real_auroc", "generated_balanced_accuracy", "generated_auroc"):
            values = [j[key] for j in judges]
            row[key] = {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}
        rows.append(row)
    return rows


def sample_grid(run: Path, path: Path, per_row: int = 8, seed: int = 11) -> None:
    """Conditional samples, one row per value (PA, AP, F, M), the same latents in every row."""
    from PIL import Image

    from medsyngan.data.imageio import image_grid
    from medsyngan.training.generate import generate_images, label_layout, load_generator, request_labels

    G, _ = load_generator(run)
    layout = label_layout(G)
    rows = [generate_images(G, per_row, seed=seed, labels=request_labels(G, per_row, seed, layout.request(**fixed)))
            for fixed in ({"view": "PA"}, {"view": "AP"}, {"sex": "F"}, {"sex": "M"})]
    Image.fromarray(image_grid(np.concatenate(rows), cols=per_row)).save(path)


def markdown(rows: list[dict]) -> str:
    """The table: each figure the mean over the judges, with their range."""
    names = {"view": "view (PA 0 / AP 1)", "sex": "sex (F 0 / M 1)", "finding": "any finding (none 0 / some 1)"}

    def cell(figure: dict) -> str:
        return f"{figure['mean']:.3f} ({figure['min']:.3f}–{figure['max']:.3f})"

    lines = ["| attribute | real eval films (class 1) | judge on real: bal. acc. | AUROC | conditional samples "
             "per value | judge on samples: bal. acc. | AUROC |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {names[r['attribute']]} | {r['eval_films']} ({r['eval_positive']}) | "
                     f"{cell(r['real_balanced_accuracy'])} | {cell(r['real_auroc'])} | {r['generated_per_value']} | "
                     f"{cell(r['generated_balanced_accuracy'])} | {cell(r['generated_auroc'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "conditional-nih")
    parser.add_argument("--images", type=int, default=38400, help="real images through D")
    parser.add_argument("--width", type=int, default=24, help="DCGAN width (model.ngf = model.ndf)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--samples", type=int, default=200, help="conditional samples per attribute value")
    parser.add_argument("--judge-steps", type=int, default=800, help="training steps of each judge")
    parser.add_argument("--judges", type=int, default=3, help="judges per attribute, one per seed")
    parser.add_argument("--docs", type=Path, help="also copy the figures and the sample grid to DIR/results/")
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few steps (figures meaningless)")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.width, args.samples, args.judge_steps, args.judges = 64, 8, 16, 5, 1
    torch.set_num_threads(1)
    train_dir, eval_dir = prepare_split(args.out / "data")
    run = args.out / ("run-quick" if args.quick else "run")
    wall = train_model(train_dir, run, args.images, args.width, args.batch)
    rows = score(run, train_dir, eval_dir, args.samples, args.judge_steps, tuple(range(args.judges)))
    result = {"images_through_d": args.images, "width": args.width, "batch": args.batch, "train_wall_s": wall,
              "machine": run_all.machine(),
              "command": " ".join(["benchmarks/conditional_nih.py", *(argv if argv is not None else sys.argv[1:])]),
              "rows": rows}
    (args.out / "conditional.json").write_text(json.dumps(result, indent=1) + "\n")
    sample_grid(run, args.out / "conditional-samples.png")
    if args.docs is not None:
        (args.docs / "results").mkdir(parents=True, exist_ok=True)
        for name in ("conditional.json", "conditional-samples.png"):
            (args.docs / "results" / name).write_bytes((args.out / name).read_bytes())
    print(markdown(rows))
    print(f"conditional DCGAN width {args.width}, {args.images} images through D, trained in {wall:.0f} s")
    return result


if __name__ == "__main__":
    main()
