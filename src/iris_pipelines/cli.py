"""The ``iris`` console script: the project's library for people who are not running a Kedro pipeline."""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from iris_pipelines import __version__

if TYPE_CHECKING:
    from iris_pipelines.registry import LoadedModel
    from iris_pipelines.segment import SegmentRequest

# No markup: file and class names such as "scan [v2].nii.gz" are printed as they are, never parsed.
console = Console(stderr=True, markup=False)


class InputError(click.ClickException):
    """Inputs that cannot be used: one line naming the file and the problem, exit code 2 (as usage errors)."""

    exit_code = 2


@contextmanager
def user_errors() -> Iterator[None]:
    """Library errors about the user's inputs become one-line ``InputError``s, never a traceback."""
    from iris_pipelines.imaging import InvalidInputError
    from iris_pipelines.inference.bundle import BundleError
    from iris_pipelines.registry import RegistryError

    try:
        yield
    except (InvalidInputError, BundleError, RegistryError) as error:
        raise InputError(str(error)) from None
    except (ValueError, KeyError) as error:  # e.g. SegmentError, a modality or strategy check
        raise InputError(str(error.args[0]) if error.args else repr(error)) from None
    except OSError as error:  # its str names the path: "[Errno 20] Not a directory: 'root/phantoms.json'"
        raise InputError(str(error)) from None


@contextmanager
def steps(total: int) -> Iterator[Callable[[str], None]]:
    """A rich progress line on stderr; the callback starts the named step."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=total)

        def advance(name: str) -> None:
            if progress.tasks[0].description != "starting":
                progress.advance(task)
            progress.update(task, description=name)

        yield advance
        progress.update(task, description="done", completed=total)


def _numbers(text: str | None, kind: type, what: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of numbers", param_hint=what
        ) from None


def _at_least_zero(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """Checked while parsing, so a typo fails before any file is read; 0 keeps the ensemble embedding."""
    if value < 0:
        raise click.BadParameter(f"must be 0 or more, got {value}")
    return value


def _finite_positive(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """As :func:`_at_least_zero`; click's FloatRange lets NaN through (every comparison with it is False)."""
    if not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a finite number above 0, got {value}")
    return value


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
    help="CT, MR or PET; read from dataset.json when omitted (MSD, nnU-Net); required for a CSV manifest.",
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

    if layout == "csv" and modality is None:
        # ingest's own message speaks of the YAML source config; here the option is what is missing.
        raise click.UsageError(
            "--layout csv needs --modality CT|MR|PET: a CSV manifest does not record the modality"
        )
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
@click.argument("root", type=click.Path(path_type=Path, file_okay=False))
# make run's collection (conf/base/parameters_ingest.yml's phantoms section), so that a bare
# `iris phantoms DIR` writes the data the README's figures come from.
@click.option("--seed", type=int, default=20250325, show_default=True)
@click.option("--cases-per-dataset", type=int, default=16, show_default=True)
@click.option(
    "--size-scale",
    type=float,
    default=1.0,
    show_default=True,
    callback=_finite_positive,
    help="Scales the voxel counts of every volume.",
)
def phantoms(root: Path, seed: int, cases_per_dataset: int, size_scale: float) -> None:
    """Write the embedded phantom collection to ROOT, in the layouts real data uses."""
    from iris_pipelines.phantoms import generate_collection

    with user_errors():
        sources = generate_collection(
            root, seed=seed, cases_per_dataset=cases_per_dataset, size_scale=size_scale
        )
    table = Table(title=f"phantom collection in {root}")
    for column in ("name", "layout", "modality", "heldout", "path"):
        table.add_column(column)
    for source in sources:
        table.add_row(
            source["name"], source["layout"], source["modality"], str(source["heldout"]), str(source["path"])
        )
    console.print(table)


class _LibraryDefault(click.Option):
    """An option whose default is computed when used (``_segment_default``): --help shows the value, where
    click would show "(dynamic)"."""

    def get_help_extra(self, ctx: click.Context) -> dict:
        extra = dict(super().get_help_extra(ctx))
        if callable(self.default):
            extra["default"] = str(self.default())
        return extra


def _segment_default(name: str) -> Callable[[], object]:
    """``SegmentRequest``'s default for ``name``, read when needed: the segment module imports torch, too
    slow to load for every ``iris`` command."""

    def default() -> object:
        from iris_pipelines.segment import SegmentRequest

        return getattr(SegmentRequest, name)

    return default


def _tracking_uri_option(fallback: str):
    return click.option(
        "--tracking-uri",
        type=str,
        default=None,
        help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {fallback}).",
    )


def _server_login(model: str, project_dir: Path, env: str | None) -> None:
    """For a registry URI, export the MLflow server login ``kedro run --env=<env>`` uses (credentials.yml;
    variables already set win), and say what is missing."""
    from iris_pipelines import registry

    if registry.is_registry_uri(model):
        for note in registry.export_credentials(project_dir, env):
            click.echo(f"note: {note}", err=True)


def _project_option(help_text: str):
    return click.option(
        "--project",
        "project_dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=".",
        show_default=True,
        help=help_text,
    )


@main.command()
@click.option(
    "--image",
    "images",
    type=click.Path(path_type=Path),
    multiple=True,
    help="A scan to segment: NIfTI, MHA, NRRD or a DICOM series directory (repeat for several).",
)
@click.option(
    "--images",
    "images_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Segment every NIfTI/MHA/NRRD file in this directory, and each subdirectory as a DICOM series "
    "(--out is then a directory).",
)
@click.option(
    "--reference",
    "references",
    multiple=True,
    metavar="IMAGE:LABEL",
    help="A reference scan and its label map (repeat for several).",
)
@click.option(
    "--embeddings",
    type=click.Path(path_type=Path),
    default=None,
    help="A task_embeddings parquet (embed_tasks output) instead of reference images, or its versioned "
    "catalog folder (data/07_model_output/task_embeddings.parquet: its newest version).",
)
@click.option("--dataset", type=str, default=None, help="Dataset of the stored embeddings / memory bank.")
@click.option(
    "--model",
    "model_ref",
    required=True,
    help="Registry URI (models:/iris/3, models:/iris@champion, models:/iris/latest), a local model bundle "
    "directory, or a versioned catalog folder of bundles (data/06_models/iris_model: its newest version).",
)
@click.option(
    "--strategy",
    type=click.Choice(["one_shot", "ensemble", "tuning", "checked", "memory_bank"]),
    default="ensemble",
    show_default=True,
    help="How the task is made: the first reference (one_shot), the mean of the references (ensemble), "
    "that mean tuned on their masks (tuning), one_shot with each class the reference check flags taken "
    "from the first reference registered to the scan (checked), or the model's memory bank.",
)
@click.option("--classes", type=str, default=None, help="Label values to segment, e.g. 1,3 (default: all).")
@click.option(
    "--labels",
    "labels_file",
    type=click.Path(path_type=Path),
    default=None,
    help='Class names: a JSON {value: name} or an MSD/nnU-Net dataset.json (whose "ignore" label, for '
    "unannotated voxels, is never segmented).",
)
@click.option(
    "--modality",
    type=click.Choice(["CT", "MR", "PET"], case_sensitive=False),
    # click would list the case-insensitive choices in lower case; the README and the sidecar use these
    metavar="[CT|MR|PET]",
    default=None,
    help="How the scans and references are normalised, as in training (default: CT). A CT must be in "
    "Hounsfield units: under the default, a scan with no air (an MR or PET scan, or stored values) is "
    "refused; naming --modality CT segments it anyway, with a warning (a CT cropped inside the body).",
)
@click.option(
    "--channel",
    type=click.IntRange(min=0),
    default=None,
    help="The volume of a 4-D (x, y, z, channel) scan or reference image to use, e.g. 0 for the first "
    "modality of a multi-modal MSD image (what ingest trains on); 4-D images are refused without it, 3-D "
    "images are used as they are.",
)
@click.option(
    "--spacing",
    type=str,
    default=None,
    help="Target spacing in mm (1.5 or 1.5,1.5,3). Default: the spacing the model bundle or its registered "
    "run records, else the one in --project's conf/base/parameters_preprocess.yml, else 3 mm; the last two "
    "are guesses, warned about: give the model's training spacing here.",
)
@click.option("--roi", type=str, default=None, help="Window in voxels (default: the training crop).")
@click.option(
    "--overlap",
    type=float,
    default=0.5,
    show_default=True,
    help="Fraction by which neighbouring sliding windows overlap, in [0, 1); more is smoother and slower.",
)
@click.option(
    "--threshold",
    type=float,
    default=0.5,
    show_default=True,
    help="Probability, in (0, 1), that a voxel's most likely class must pass to be labelled.",
)
@click.option(
    "--tuning-steps",
    type=int,
    cls=_LibraryDefault,
    default=_segment_default("tuning_steps"),
    show_default=True,
    callback=_at_least_zero,
    help="Adam steps of --strategy tuning.",
)
@click.option(
    "--tuning-lr",
    type=float,
    cls=_LibraryDefault,
    default=_segment_default("tuning_lr"),
    show_default=True,
    callback=_finite_positive,
    help="Learning rate of --strategy tuning.",
)
@click.option(
    "--reference-check/--no-reference-check",
    default=True,
    show_default=True,
    help="Segment each reference image with the task and warn about the classes the model does not find "
    "again there (Dice below 0.5): it does not recognise them from these references, so their segmentation "
    "of the scans is unreliable. One extra segmentation per reference; the Dice goes into the sidecar.",
)
@click.option("--device", type=str, default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@_tracking_uri_option("sqlite:///<project>/mlflow.db")
@_project_option("Kedro project whose conf/base gives the default preprocessing and whose mlflow.db holds "
                 "--model's registry version.")  # fmt: skip
@click.option(
    "--env",
    type=str,
    default=None,
    help="Kedro env whose mlflow.yml and credentials.yml give the MLflow server login for a registry "
    "--model, as for `kedro run --env` (default: local; variables already exported win). Only the login: "
    "preprocessing defaults come from conf/base.",
)
@click.option(
    "--out",
    "out_text",
    # the text as typed: Path drops the trailing separator that makes `--out newdir/` a directory
    type=click.Path(),
    required=True,
    help="Label map to write (NIfTI, MHA or NRRD), or a directory (an existing one, or ending in /) for "
    "several scans; a JSON sidecar is "
    "written next to each. Outputs of an earlier run there are replaced, and its <out stem>_probabilities "
    "removed when this run does not save them; in a directory, a scan that fails has them removed.",
)
@click.option(
    "--out-suffix",
    type=str,
    default=None,
    help="Format of the label maps in an --out directory: .nii.gz, .nii, .mha or .nrrd (default: each "
    "scan's own; DICOM: .nii.gz).",
)
@click.option(
    "--save-probabilities",
    is_flag=True,
    help="Also write <out stem>_probabilities (same format): a float32 4-D image on the scan's grid, each "
    "class's foreground probability along the fourth axis, in label order (as nnU-Net's "
    "--save_probabilities; K × the scan's size in float32).",
)
def segment(images: tuple[Path, ...], images_dir: Path | None, references: tuple[str, ...],
            embeddings: Path | None, dataset: str | None, model_ref: str, strategy: str, classes: str | None,
            labels_file: Path | None, modality: str | None, channel: int | None, spacing: str | None,
            roi: str | None,
            overlap: float, threshold: float, tuning_steps: int, tuning_lr: float, reference_check: bool,
            device: str,
            tracking_uri: str | None, project_dir: Path, env: str | None, out_text: str,
            out_suffix: str | None, save_probabilities: bool) -> None:  # fmt: skip
    """Segment scans in context: the classes shown by the references (or stored task embeddings).

    Each label map is written on its scan's own grid (size, spacing, origin, direction), with
    `<out stem>.json` beside it: class names, label values, volumes in ml, strategy, and the model (the
    registry version or bundle directory --model resolved to, and its weights checksum). With
    several scans (repeated --image, or --images DIR) the task is encoded once, --out is a directory, a
    scan that fails is reported and skipped, and `segmentations.csv` there lists every scan's outcome
    (exit 1 when any failed).
    """
    from iris_pipelines import registry
    from iris_pipelines.imaging.io import file_suffix
    from iris_pipelines.segment import ReferenceSpec, SegmentRequest, require_writable_directory, scans_in
    from iris_pipelines.segment import segment as run_segment

    spacing_mm = _numbers(spacing, float, "--spacing")
    roi_size = _numbers(roi, int, "--roi")
    out = Path(out_text)
    with user_errors():
        scans = list(images) + (scans_in(images_dir, exclude=out) if images_dir is not None else [])
    if not scans:
        raise click.UsageError("give a scan to segment: --image SCAN (repeatable) or --images DIR")
    names_directory = out_text.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep))
    batch = len(scans) > 1 or images_dir is not None or out.is_dir() or names_directory
    if out_suffix is not None and not batch:
        raise click.UsageError("--out-suffix names the format of label maps in an --out directory")
    if batch and not out.is_dir() and not names_directory and file_suffix(out):
        # it would become a directory named like a label map, holding the label maps
        raise click.UsageError(
            f"--out {out_text} names a label map, but several scans (repeated --image, or --images) write "
            "a directory of them: give a directory (e.g. labels/)"
        )
    with user_errors():
        request = SegmentRequest(
            image=None if batch else scans[0],
            out=None if batch else out,
            references=[ReferenceSpec.parse(text) for text in references],
            embeddings=embeddings,
            dataset=dataset,
            strategy=strategy,
            classes=_numbers(classes, int, "--classes"),
            labels_file=labels_file,
            modality=(modality or "CT").upper(),
            require_air=modality is None,
            roi_size=None if roi_size is None else tuple(roi_size * 3 if len(roi_size) == 1 else roi_size),
            overlap=overlap,
            threshold=threshold,
            tuning_steps=tuning_steps,
            tuning_lr=tuning_lr,
            device=device,
            save_probabilities=save_probabilities,
            channel=channel,
            reference_check=reference_check,
        )
        request.check()
        require_writable_directory(out if batch else out.parent, out)  # before the model is fetched
        _server_login(model_ref, project_dir, env)
        if batch:
            _segment_scans(request, scans, out, out_suffix, model_ref, tracking_uri, project_dir, spacing_mm)
            return
        with steps(6 if request.references and reference_check else 5) as step:
            step("loading model")
            model = registry.load_model_bundle(model_ref, registry.tracking_uri(tracking_uri, project_dir))
            result = run_segment(
                request,
                model.bundle,
                model_uri=model_ref,
                model_source=model.source(),
                recorded_parameters=model.record.parameters() if model.record is not None else None,
                project_dir=project_dir,
                spacing=spacing_mm,
                on_step=step,
            )
    table = Table(title=f"{result.label_path} ({result.summary['strategy']}, {model.describe()})")
    for column in ("label", "name", "voxels", "volume (ml)"):
        table.add_column(column, justify="right" if column in ("voxels", "volume (ml)") else "left")
    for row in result.summary["classes"]:
        table.add_row(str(row["label"]), row["name"], str(row["voxels"]), f"{row['volume_ml']:.2f}")
    console.print(table)
    console.print(f"sidecar: {result.sidecar_path}")
    if result.summary["probabilities"] is not None:
        console.print(f"probabilities: {result.summary['probabilities']['path']}")
    _registry_notes(model)


def _registry_notes(model: LoadedModel) -> None:
    """What the registry lookup noted: newer versions `latest` passed over, a run that did not finish."""
    for problem in model.record.problems if model.record is not None else []:
        click.echo(f"note: {problem}", err=True)


@main.command()
@click.argument("model_uri")
@click.option(
    "--reproduce",
    "run_reproduce",
    is_flag=True,
    help="Re-run embed_tasks + evaluate on the recorded data versions and compare.",
)
@click.option(
    "--tolerance",
    type=float,
    default=1e-6,
    show_default=True,
    help="Largest |recorded - reproduced| accepted per metric.",
)
@_tracking_uri_option("sqlite:///<project>/mlflow.db")
@_project_option("Kedro project whose catalog locates the recorded data versions.")
@click.option(
    "--env",
    type=str,
    default=None,
    help="Kedro env whose mlflow.yml and credentials.yml give the MLflow server login, as for `kedro run "
    "--env` (default: local; variables already exported win), and whose catalog --reproduce reads "
    "(default: the recorded env).",
)
@click.option(
    "--data-root",
    type=str,
    default=None,
    help="Override globals.data_root of the catalog (relative: to the current directory).",
)
def review(model_uri: str, run_reproduce: bool, tolerance: float, tracking_uri: str | None,
           project_dir: Path, env: str | None, data_root: str | None) -> None:  # fmt: skip
    """Provenance of a registered model version (models:/iris/7): code, data, config, metrics.

    With --reproduce, exits 1 unless every recorded evaluation number is recomputed within --tolerance,
    and 2 when reproduction cannot be attempted (data versions, config or evaluation not found).
    """
    from iris_pipelines import registry
    from iris_pipelines import review as reviewing

    _server_login(model_uri, project_dir, env)
    with user_errors():
        record = registry.resolve(model_uri, registry.tracking_uri(tracking_uri, project_dir))
        parameters = record.parameters()
    for title, rows in reviewing.provenance(record, project_dir, parameters):
        table = Table(title=title, title_justify="left", show_header=False)
        table.add_column("key", style="bold")
        table.add_column("value", overflow="fold")
        for key, value in rows:
            table.add_row(key, value)
        console.print(table)
    for problem in record.problems:
        click.echo(f"note: {problem}", err=True)
    if not run_reproduce:
        return
    with user_errors(), steps(5) as step:
        result = reviewing.reproduce(
            record,
            project_dir=project_dir,
            env=env or reviewing.default_env(record, project_dir),
            data_root=data_root,
            tolerance=tolerance,
            parameters=parameters,
            on_step=step,
        )
    for note in result.notes:
        click.echo(f"warning: {note}", err=True)
    if not result.comparisons:
        # Nothing was recomputed, so nothing "differs": the inputs are the problem, not the model.
        raise InputError(f"could not attempt to reproduce {model_uri}: {'; '.join(result.errors)}")
    table = Table(title=f"reproduction of {model_uri} (tolerance {tolerance:g})")
    for column in ("metric", "recorded", "reproduced", "|diff|", "ok"):
        table.add_column(column)
    for c in result.comparisons:
        reproduced = "(missing)" if c.reproduced is None else f"{c.reproduced:.6f}"
        table.add_row(c.metric, f"{c.recorded:.6f}", reproduced, f"{c.difference:.2e}", "✔" if c.ok else "✘")
    console.print(table)
    failed = [c.metric for c in result.comparisons if not c.ok]
    if failed:
        click.echo(f"NOT REPRODUCED: {len(failed)} of {len(result.comparisons)} metric(s) differ"
                   f" ({', '.join(failed)})", err=True)  # fmt: skip
        sys.exit(1)
    click.echo(f"reproduced: all {len(result.comparisons)} recorded metric(s) within {tolerance:g}", err=True)


def _segment_scans(request: SegmentRequest, scans: list[Path], out_dir: Path, out_suffix: str | None,
                   model_ref: str, tracking_uri: str | None, project_dir: Path,
                   spacing: list | None) -> None:  # fmt: skip
    """The batch form of ``iris segment``: one task, many scans; exits 1 when any scan failed."""
    from iris_pipelines import registry
    from iris_pipelines.segment import batch_outputs, segment_batch

    # name clashes fail before the model is fetched
    batch_outputs(
        scans, out_dir, out_suffix, inputs=request.inputs(), class_name_files=request.class_name_files()
    )
    with steps(len(scans) + 2) as step:
        step("loading model")
        model = registry.load_model_bundle(model_ref, registry.tracking_uri(tracking_uri, project_dir))
        step("reading references and encoding the task")
        outcome = segment_batch(
            request, scans, out_dir, model.bundle, model_uri=model_ref, model_source=model.source(),
            out_suffix=out_suffix, recorded_parameters=model.record.parameters() if model.record else None,
            project_dir=project_dir, spacing=spacing, on_scan=lambda scan: step(f"segmenting {scan.name}"),
        )  # fmt: skip
    table = Table(title=f"{len(scans)} scans ({request.strategy}, {model.describe()})")
    for column in ("scan", "status", "label map or reason"):
        table.add_column(column, overflow="fold")
    failed = dict(outcome.failures)
    written = {result.summary["image"]: result for result in outcome.results}
    for scan in scans:
        if scan in failed:
            table.add_row(str(scan), "failed", failed[scan])
        else:
            table.add_row(str(scan), "ok", str(written[str(scan)].label_path))
    console.print(table)
    console.print(f"summary: {outcome.summary_path}")
    _registry_notes(model)
    if outcome.failures:
        click.echo(
            f"{len(outcome.failures)} of {len(scans)} scan(s) failed; see {outcome.summary_path}", err=True
        )
        sys.exit(1)


# Kedro imports `<package>.cli.cli` for the project's own commands, so `kedro validate …` works as well.
cli = main
