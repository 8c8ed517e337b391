"""`medsyngan data` commands: phantoms, prepare, partition."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

data_app = typer.Typer(help="Build, prepare and partition chest X-ray datasets.", no_args_is_help=True)


@data_app.command("phantoms")
def phantoms_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder to write (NIH layout: images/, Data_Entry CSV, split lists).")],
    patients: Annotated[int, typer.Option("--patients", min=1, help="Synthetic patients.")] = 100,
    images_per_patient: Annotated[int, typer.Option("--images-per-patient", min=1, help="Images per patient.")] = 3,
    size: Annotated[int, typer.Option("--size", min=16, max=4096, help="Image side in pixels.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed gives the same images.")] = 0,
) -> None:
    """Render procedural chest X-ray phantoms with findings recorded as NIH labels."""
    from collections import Counter

    from medsyngan.data.phantoms import write_phantoms
    from medsyngan.errors import UserError
    from medsyngan.rundir import console, progress

    if out.exists() and any(out.iterdir()) and not (out / "Data_Entry_2017_v2020.csv").is_file():
        raise UserError(f"{out}: folder is not empty and holds no phantoms; choose another --out")
    with progress() as bar:
        task = bar.add_task("phantoms", total=patients * images_per_patient)
        records = write_phantoms(out, patients, images_per_patient, size, seed, progress_cb=lambda k: bar.advance(task, k))
    counts = Counter(lab for r in records[::images_per_patient] for lab in (r.labels or ("No Finding",)))
    console.print(
        f"wrote {len(records)} images of {patients} patients ({size} px) to {out}; patients by finding: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    )


@data_app.command("prepare")
def prepare_cmd(
    source: Annotated[Path, typer.Option("--source", help="NIH folder (with Data_Entry_2017*.csv) or a folder of PNG/JPEG/DICOM.")],
    out: Annotated[Path, typer.Option("--out", help="Prepared dataset folder to write.")],
    size: Annotated[int, typer.Option("--size", help="Output side in pixels (64/128/224/256 are common).")] = 64,
    equalize: Annotated[str, typer.Option("--equalize", help="none | hist | clahe.")] = "none",
    views: Annotated[Optional[str], typer.Option("--views", help="Comma-separated view positions to keep, e.g. PA,AP (default: all).")] = None,
    split: Annotated[str, typer.Option("--split", help="train_val | test | all (official NIH split, or the CSV's split column).")] = "all",
    aspect: Annotated[str, typer.Option("--aspect", help="Non-square images: crop (centre) | pad (black).")] = "crop",
    images: Annotated[Optional[Path], typer.Option("--images", help="NIH only: folder holding the PNGs (default: SOURCE/images).")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="Folder only: CSV with image[,patient,labels,view,split].")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip missing/unreadable images (listed in skipped.csv) instead of stopping.")] = False,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Processes (0: every core).")] = 0,
) -> None:
    """Greyscale, square, resize and optionally equalize into a memory-mapped prepared dataset."""
    from collections import Counter

    from medsyngan.data.prepare import PrepareSettings, prepare
    from medsyngan.rundir import console, progress

    settings = PrepareSettings(
        size=size, equalize=equalize, aspect=aspect, split=split, skip_bad=skip_bad,
        views=tuple(v.strip() for v in views.split(",") if v.strip()) if views else (),
    )
    with progress() as bar:
        task = bar.add_task("prepare", total=None)

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        result = prepare(source, out, settings, images_dir=images, labels_csv=labels, workers=workers, progress_cb=tick)
    ds = result.dataset
    if not result.rebuilt:
        console.print(f"{out} is up to date ({len(ds)} images, {ds.size} px); nothing to do")
        return
    findings = Counter(lab for labs in ds.labels for lab in (labs or ("No Finding",)))
    console.print(
        f"prepared {len(ds)} images of {len(set(ds.patients.tolist()))} patients at {ds.size} px into {out} "
        f"in {result.seconds:.1f}s ({len(ds) / max(result.seconds, 1e-9):.0f} img/s)"
    )
    console.print("findings: " + ", ".join(f"{k} {v}" for k, v in findings.most_common()))
    if result.skipped:
        console.print(f"[yellow]skipped {len(result.skipped)} images[/] (see {out / 'skipped.csv'}); first:")
        for name, reason in result.skipped[:5]:
            console.print(f"  {name}: {reason}", highlight=False)


@data_app.command("partition")
def partition_cmd(
    data: Annotated[Path, typer.Option("--data", help="Prepared dataset folder (from `data prepare`).")],
    hospitals: Annotated[int, typer.Option("--hospitals", help="Number of hospitals.")],
    out: Annotated[Path, typer.Option("--out", help="CSV to write (image,patient,hospital); a PNG chart is written beside it.")],
    scheme: Annotated[str, typer.Option("--scheme", help="iid | patient | label-skew | quantity-skew.")] = "patient",
    alpha: Annotated[float, typer.Option("--alpha", help="Dirichlet concentration for label-skew/quantity-skew (small: strong skew).")] = 0.5,
    seed: Annotated[int, typer.Option("--seed", help="Seed: the same seed gives the same partition.")] = 0,
) -> None:
    """Split a prepared dataset into patient-disjoint hospitals."""
    from rich.table import Table

    from medsyngan.data.partition import partition, plot_summary, summary, write_partition_csv
    from medsyngan.data.prepared import PreparedDataset
    from medsyngan.rundir import console

    ds = PreparedDataset.open(data)
    hospital = partition(ds.patients, ds.labels, hospitals, scheme, alpha, seed)
    write_partition_csv(out, ds.image_names, ds.patients, hospital)
    rows = summary(hospital, ds.patients, ds.labels)
    chart = out.with_suffix(".png")
    plot_summary(rows, chart)
    names = sorted({k for r in rows for k in r["labels"]}, key=lambda n: (n != "No Finding", n))
    # One column per hospital: the findings list can be long, the hospital count is small.
    table = Table(title=f"{scheme} partition of {len(ds)} images into {hospitals} hospitals")
    table.add_column("")
    for r in rows:
        table.add_column(f"H{r['hospital']}", justify="right")
    table.add_row("images", *(str(r["images"]) for r in rows))
    table.add_row("patients", *(str(r["patients"]) for r in rows), end_section=True)
    for n in names:
        table.add_row(n, *(str(r["labels"].get(n, 0)) for r in rows))
    console.print(table)
    console.print(f"wrote {out} and {chart}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
