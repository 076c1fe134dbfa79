"""The ``iris`` console script: the project's library for people who are not running a Kedro pipeline."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from iris_pipelines import __version__

console = Console(stderr=True)


@click.group()
@click.version_option(__version__, prog_name="iris")
def main() -> None:
    """Iris in-context segmentation of 3-D medical scans."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--layout",
    type=click.Choice(["msd", "nnunet", "csv"]),
    required=True,
    help="How the dataset is laid out on disk.",
)
@click.option(
    "--modality",
    type=str,
    default=None,
    help="CT, MR or PET; read from dataset.json when omitted (MSD, nnU-Net).",
)
@click.option("--name", type=str, default=None, help="Dataset name (default: the folder name).")
@click.option(
    "--subject-pattern",
    type=str,
    default=None,
    help="Regex with one group mapping a case id to its subject id.",
)
@click.option(
    "--tolerance-mm",
    type=float,
    default=1e-3,
    show_default=True,
    help="How far image and label grids may differ.",
)
def validate(
    path: Path,
    layout: str,
    modality: str | None,
    name: str | None,
    subject_pattern: str | None,
    tolerance_mm: float,
) -> None:
    """Check a dataset as `ingest` would, before a long run: every rejected case with its reason.

    Exits 1 when any case is rejected.
    """
    from iris_pipelines.collection import ingest_sources

    source = {
        "name": name or path.resolve().name,
        "layout": layout,
        "path": str(path),
        "modality": modality,
        "subject_pattern": subject_pattern,
    }
    manifest, report = ingest_sources([source], strict=False, tolerance_mm=tolerance_mm)
    summary = Table(title=f"{source['name']}: {len(manifest)} accepted, {len(report)} rejected")
    for column in ("case_id", "subject_id", "modality", "size", "spacing"):
        summary.add_column(column)
    for row in manifest.itertuples():
        summary.add_row(
            row.case_id,
            row.subject_id,
            row.modality,
            "×".join(map(str, row.size)),
            "×".join(f"{s:.2f}" for s in row.spacing),
        )
    console.print(summary)
    if len(report):
        # One plain line per reject, not a table: paths and reasons stay whole, ready to copy or grep.
        for row in report.itertuples():
            click.echo(
                f"rejected {row.case_id or '(dataset)'} [{row.check}] {row.path}: {row.reason}", err=True
            )
        sys.exit(1)


@main.command()
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--cases-per-dataset", type=int, default=8, show_default=True)
@click.option(
    "--size-scale",
    type=float,
    default=1.0,
    show_default=True,
    help="Scales the voxel counts of every volume.",
)
def phantoms(root: Path, seed: int, cases_per_dataset: int, size_scale: float) -> None:
    """Write the embedded phantom collection to ROOT, in the layouts real data uses."""
    from iris_pipelines.phantoms import generate_collection

    sources = generate_collection(root, seed=seed, cases_per_dataset=cases_per_dataset, size_scale=size_scale)
    table = Table(title=f"phantom collection in {root}")
    for column in ("name", "layout", "modality", "heldout", "path"):
        table.add_column(column)
    for source in sources:
        table.add_row(
            source["name"], source["layout"], source["modality"], str(source["heldout"]), str(source["path"])
        )
    console.print(table)


# Kedro imports `<package>.cli.cli` for the project's own commands, so `kedro validate …` works as well.
cli = main
