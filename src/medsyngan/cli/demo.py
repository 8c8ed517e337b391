"""`medsyngan demo`: for now, the data pipeline end to end on phantoms (the demo issue replaces this)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's files.")] = Path("runs/demo"),
    patients: Annotated[int, typer.Option("--patients", min=3, help="Synthetic patients.")] = 60,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels.")] = 64,
) -> None:
    """Run what is built so far end to end: phantoms → prepare → 3-hospital label-skew partition."""
    import time

    import numpy as np
    from PIL import Image

    from medsyngan.data.partition import partition, plot_summary, summary, write_partition_csv
    from medsyngan.data.phantoms import grid_image, write_phantoms
    from medsyngan.data.prepare import PrepareSettings, prepare
    from medsyngan.rundir import atomic_write_bytes, console

    start = time.perf_counter()
    raw, prepared = out / "phantoms", out / "prepared"
    records = write_phantoms(raw, patients, 3, size * 2, seed=0)
    console.print(f"1. phantoms: {len(records)} images of {patients} patients ({size * 2} px, NIH layout) in {raw}")
    result = prepare(raw, prepared, PrepareSettings(size=size))
    ds = result.dataset
    console.print(f"2. prepare: {len(ds)} images at {ds.size} px in {prepared} ({'built' if result.rebuilt else 'up to date'})")
    hospital = partition(ds.patients, ds.labels, 3, "label-skew", alpha=0.5, seed=0)
    write_partition_csv(out / "partition.csv", ds.image_names, ds.patients, hospital)
    rows = summary(hospital, ds.patients, ds.labels)
    plot_summary(rows, out / "partition.png")
    console.print("3. partition (label-skew, alpha 0.5):")
    for r in rows:
        labels = ", ".join(f"{k} {v}" for k, v in sorted(r["labels"].items()))
        console.print(f"   hospital {r['hospital']}: {r['images']} images, {r['patients']} patients ({labels})")
    import io

    buf = io.BytesIO()
    Image.fromarray(grid_image([np.asarray(ds.images[i]) for i in range(min(16, len(ds)))], 4)).save(buf, format="PNG")
    atomic_write_bytes(out / "phantoms-grid.png", buf.getvalue())
    console.print(f"   sample grid: {out / 'phantoms-grid.png'}; chart: {out / 'partition.png'}")
    console.print(
        f"[bold]data pipeline done in {time.perf_counter() - start:.1f}s.[/] Not built yet in this demo: GAN "
        "training, federated rounds, differential privacy, evaluation and the report."
    )


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)
