"""Draw truth, the paste baseline, one-shot and ensemble Iris on one held-out case (docs screenshot).

    python scripts/segmentation_overlay.py [--project DIR] [--env ENV] [--episode ID] [--out PNG]

Reads the latest ``iris_model``, ``episode_index`` and ``preprocessed_manifest`` from the project's catalog
and makes the same library calls as ``notebooks/01_quickstart.ipynb``: per-class reference windows
(``class_embeddings``; ``evaluate.roi_size``, or the model's training crop when it is left out, as in
``evaluate``), ``context_ensemble``, ``sliding_window_segment`` and ``logits_to_labels``. The default
episode is the first test episode of a held-out dataset; the figure shows an axial and a coronal slice
through the middle of the true labels, with Dice per method on the preprocessed grid. Default output:
``docs/segmentation-overlay.png``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path(os.environ.get("IRIS_PROJECT", ROOT)))
    parser.add_argument("--env", default=os.environ.get("IRIS_ENV") or None, help="Kedro env (default local)")
    parser.add_argument("--episode", default=None, help="episode id, e.g. PelvisCT/pelvic_000")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "segmentation-overlay.png")
    return parser.parse_args()


def dice(prediction: np.ndarray, truth: np.ndarray, classes: list[int]) -> float:
    """Mean Dice over ``classes``."""
    values = []
    for value in classes:
        predicted, true = prediction == value, truth == value
        total = predicted.sum() + true.sum()
        values.append(2 * np.logical_and(predicted, true).sum() / total if total else 1.0)
    return float(np.mean(values))


def main() -> None:
    args = parse_args()
    project = args.project.resolve()
    bootstrap_project(project)
    context = KedroSession.create(project_path=project, env=args.env).load_context()
    catalog, params = context.catalog, context.params

    # After bootstrap_project, so the project's own package is the one imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from iris_pipelines.evaluation.embeddings import as_tensor, class_embeddings, load_arrays
    from iris_pipelines.imaging.registration import paste_label
    from iris_pipelines.inference import strategies
    from iris_pipelines.inference.sliding_window import sliding_window_segment
    from iris_pipelines.pipelines.embed_tasks.nodes import roi_size_or_training_crop
    from iris_pipelines.training.sampler import case_records

    manifest, episode_index = catalog.load("preprocessed_manifest"), catalog.load("episode_index")
    records = case_records(manifest)
    heldout = {case["dataset"] for case in episode_index["cases"] if case["heldout"]}
    episodes = [e for e in episode_index["episodes"] if e["split"] == "test" and e["dataset"] in heldout]
    episode = next((e for e in episodes if args.episode in (None, e["episode_id"])), None)
    if episode is None:
        raise SystemExit(f"no held-out test episode {args.episode or ''} in episode_index")
    dataset = episode["dataset"]
    query = records[(dataset, episode["query"])]
    references = [records[(dataset, case)] for case in episode["references"]]
    classes = [
        int(c) for c in episode["classes"] if int(c) in query.bboxes and int(c) in references[0].bboxes
    ]
    names = {c: episode_index["classes"][dataset][str(c)]["name"] for c in classes}
    image, truth = load_arrays(query)

    evaluate = params["evaluate"]
    bundle = catalog.load("iris_model")
    # As evaluate: evaluate.roi_size, or the model's training crop when it is left out (null).
    roi = roi_size_or_training_crop(bundle, evaluate.get("roi_size"), "evaluate")
    print(f"window {'x'.join(map(str, roi))} voxels")
    model = bundle.build_model().to("cuda" if torch.cuda.is_available() else "cpu")
    pool, valid = [], []
    for reference in references:
        ref_image, ref_label = load_arrays(reference)
        present = [c for c in classes if c in reference.bboxes]
        if not present:
            continue
        encoded = class_embeddings(model, ref_image, ref_label, present, roi)
        slots = torch.zeros(1, len(classes), *encoded.shape[2:], device=encoded.device)
        for slot, value in enumerate(present):
            slots[0, classes.index(value)] = encoded[0, slot]
        pool.append(slots)
        valid.append(torch.tensor([c in present for c in classes]))
    pool, valid = torch.cat(pool), torch.stack(valid)
    tasks = {"one-shot": pool[:1], "ensemble": strategies.context_ensemble(pool, valid)}

    _, first_label = load_arrays(references[0])
    pasted = paste_label(first_label, image.shape)
    panels = {"truth": truth, "paste baseline": np.where(np.isin(pasted, classes), pasted, 0)}
    with torch.no_grad():
        for name, task in tasks.items():
            logits = sliding_window_segment(
                model, as_tensor(image), task, roi_size=roi, overlap=evaluate["overlap"]
            )
            panels[name] = strategies.logits_to_labels(logits, classes, evaluate["threshold"]).cpu().numpy()

    colours = plt.get_cmap("tab10").colors

    def overlay(label: np.ndarray) -> np.ndarray:
        rgba = np.zeros((*label.shape, 4))
        for value in np.unique(label[label > 0]):
            rgba[label == value] = (*colours[(int(value) - 1) % len(colours)], 0.5)
        return rgba

    z, y = (int(round(v)) for v in np.argwhere(truth > 0).mean(axis=0)[:2])
    figure, axes = plt.subplots(2, len(panels), figsize=(3.4 * len(panels), 7.2))
    for column, (title, labels) in enumerate(panels.items()):
        score = "" if title == "truth" else f" (Dice {dice(labels, truth, classes):.2f})"
        views = [
            (
                f"{title}{score}\naxial {z}",
                image[z],
                labels[z],
                "upper",
            ),  # LPS: anterior up, left on the right
            (f"coronal {y}", image[:, y], labels[:, y], "lower"),  # superior up
        ]
        for row, (caption, picture, mask, origin) in enumerate(views):
            axis = axes[row, column]
            axis.imshow(picture, cmap="gray", origin=origin)
            axis.imshow(overlay(mask), origin=origin, interpolation="nearest")
            axis.set_title(caption, fontsize=9)
            axis.set_axis_off()
    version = (catalog.load("registered_model") or {}).get("version", "?")
    figure.suptitle(
        f"{episode['episode_id']}: held-out dataset {dataset}, {len(pool)} references, "
        f"model iris v{version} ({bundle.metadata.get('final_step')} steps)",
        fontsize=10,
    )
    handles = [Patch(color=colours[(c - 1) % len(colours)], label=f"{c} {n}") for c, n in names.items()]
    figure.legend(handles=handles, loc="lower center", ncols=min(len(handles), 6), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.04, 1, 0.97))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
