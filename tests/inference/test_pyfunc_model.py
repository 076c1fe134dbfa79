"""The registered pyfunc (models from code + safetensors bundle) segments a query with no pickle."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from iris_pipelines.inference.bundle import ModelBundle
from iris_pipelines.model import Iris, IrisConfig

PYFUNC_SOURCE = Path(__file__).parents[2] / "src" / "iris_pipelines" / "inference" / "pyfunc_model.py"
# The lowest foreground probability cut a test needs: every voxel whose logit is above about −27.6.
LOWEST_THRESHOLD = 1e-12


def _request(shape: tuple[int, int, int] = (12, 16, 20)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[2:6, 3:9, 4:10] = 1
    mask[7:11, 8:14, 10:18] = 3
    return {
        "query": rng.normal(size=shape).astype(np.float32),
        "reference_image": rng.normal(size=shape).astype(np.float32),
        "reference_mask": mask,
    }


def test_registered_pyfunc_segments_a_query(mlflow_store: str, tmp_path: Path) -> None:
    from iris_pipelines.inference.pyfunc_model import MODEL_CONFIG, SIGNATURE

    torch.manual_seed(0)
    bundle_dir = ModelBundle.from_model(Iris(IrisConfig.tiny())).save(tmp_path / "bundle")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="iris",
            python_model=str(PYFUNC_SOURCE),
            artifacts={"bundle": str(bundle_dir)},
            registered_model_name="iris",
            pip_requirements=["torch", "safetensors"],
            signature=SIGNATURE,
            model_config=MODEL_CONFIG,
        )
    uri = f"models:/iris/{info.registered_model_version}"
    model_dir = Path(mlflow.artifacts.download_artifacts(uri))
    assert not list(model_dir.rglob("*.pkl")), "models from code must not pickle the model object"

    model = mlflow.pyfunc.load_model(uri)
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")  # "auto"
    assert next(model.unwrap_python_model().model.parameters()).device == expected
    on_cpu = mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})
    assert next(on_cpu.unwrap_python_model().model.parameters()).device == torch.device("cpu")
    with pytest.raises(Exception, match="device 'no-such-device'"):
        mlflow.pyfunc.load_model(uri, model_config={"device": "no-such-device"})
    request = _request()
    labels = model.predict(request)
    assert labels.shape == request["query"].shape
    assert np.issubdtype(labels.dtype, np.integer)
    assert set(np.unique(labels)) <= {0, 1, 3}

    everything = model.predict(request, params={"threshold": LOWEST_THRESHOLD})  # every voxel gets some class
    assert set(np.unique(everything)) <= {1, 3} and everything.min() > 0
    only_three = model.predict({**request, "classes": [3]}, params={"threshold": LOWEST_THRESHOLD})
    assert set(np.unique(only_three)) == {3}
    as_frame = pd.DataFrame([{k: v for k, v in request.items()}])
    assert model.predict(as_frame).shape == request["query"].shape
    pairs = {
        "reference_image": [request["reference_image"]] * 2,
        "reference_mask": [request["reference_mask"]] * 2,
    }
    twice = model.predict({**request, **pairs}, params={"threshold": LOWEST_THRESHOLD})  # a context ensemble
    np.testing.assert_array_equal(twice, everything)


def test_bad_requests_are_explained() -> None:
    from iris_pipelines.inference.pyfunc_model import IrisPyfuncModel  # importing registers nothing harmful

    pyfunc = IrisPyfuncModel()
    pyfunc.model = Iris(IrisConfig.tiny()).eval()
    pyfunc.bundle = ModelBundle.from_model(pyfunc.model)
    request = _request()
    with pytest.raises(ValueError, match="lacks \\['reference_mask'\\]"):
        pyfunc.predict(None, {k: v for k, v in request.items() if k != "reference_mask"})
    with pytest.raises(ValueError, match="absent from reference_mask"):
        pyfunc.predict(None, {**request, "classes": [2]})
    with pytest.raises(ValueError, match="must be a non-empty 3-D array"):
        pyfunc.predict(None, {**request, "query": request["query"][0]})
    with pytest.raises(ValueError, match="must be a non-empty 3-D array"):
        pyfunc.predict(None, {**request, "query": np.zeros((0, 16, 20), np.float32)})
    nan_query = request["query"].copy()
    nan_query[3, 4, 5] = np.nan  # made every voxel background, even at the lowest threshold
    with pytest.raises(ValueError, match=r"query has 1 NaN or infinite voxel\(s\)"):
        pyfunc.predict(None, {**request, "query": nan_query})
    soft = request["reference_mask"] * 0.6  # label 3 became 1 by truncation
    with pytest.raises(ValueError, match="reference_mask must hold whole-number label values"):
        pyfunc.predict(None, {**request, "reference_mask": soft})
    with pytest.raises(ValueError, match="must be whole label values"):
        pyfunc.predict(None, {**request, "classes": [1.5]})
    for threshold in (0.0, 1.0, 1.5):  # 0 labelled every voxel and 1.5 none, where evaluate refuses both
        with pytest.raises(ValueError, match=r"threshold must lie in \(0, 1\)"):
            pyfunc.predict(None, request, params={"threshold": threshold})


def test_an_empty_classes_cell_means_every_class_and_non_finite_classes_are_refused() -> None:
    """A DataFrame request whose ``classes`` cell is empty holds NaN there (pandas fills the missing cell
    when rows with and without classes are combined): it failed with "cannot convert float NaN to
    integer" instead of segmenting every class, as a dict request without classes does."""
    from iris_pipelines.inference.pyfunc_model import IrisPyfuncModel

    torch.manual_seed(0)
    pyfunc = IrisPyfuncModel()
    pyfunc.model = Iris(IrisConfig.tiny()).eval()
    pyfunc.bundle = ModelBundle.from_model(pyfunc.model)
    request = _request()
    every_class = pyfunc.predict(None, request, params={"threshold": LOWEST_THRESHOLD})
    with_classes = pd.DataFrame([{**request, "classes": [3]}])
    without_classes = pd.DataFrame([request])
    empty_cell = pd.concat([with_classes.iloc[:0], without_classes], ignore_index=True)
    assert pd.isna(empty_cell.loc[0, "classes"])
    for frame in (empty_cell, empty_cell.astype({"classes": object}).fillna({"classes": pd.NA})):
        labels = pyfunc.predict(None, frame, params={"threshold": LOWEST_THRESHOLD})
        np.testing.assert_array_equal(labels, every_class)
    for bad in ([np.nan], [1, np.inf], [None]):
        with pytest.raises(ValueError, match="must be whole label values"):
            pyfunc.predict(None, {**request, "classes": bad})


def test_flipped_views_and_boolean_masks_are_accepted() -> None:
    from iris_pipelines.inference.pyfunc_model import segment_one_shot

    torch.manual_seed(0)
    model = Iris(IrisConfig.tiny()).eval()
    request = _request()
    flipped = {key: value[::-1] for key, value in request.items()}  # torch refuses negative strides
    labels = segment_one_shot(model, **flipped, threshold=LOWEST_THRESHOLD)
    assert labels.shape == request["query"].shape and set(np.unique(labels)) <= {1, 3}
    binary = segment_one_shot(
        model, request["query"], request["reference_image"], request["reference_mask"] > 0
    )
    assert set(np.unique(binary)) <= {0, 1}


def test_a_query_larger_than_the_training_crop_is_segmented_in_windows(monkeypatch) -> None:
    """As evaluate and iris segment: classes encoded around themselves, the query window by window."""
    from iris_pipelines.inference import sliding_window
    from iris_pipelines.inference.pyfunc_model import segment_one_shot

    torch.manual_seed(0)
    model = Iris(IrisConfig.tiny()).eval()
    windows = []
    real_predictor = sliding_window.window_predictor

    def counting(model, task):
        predict = real_predictor(model, task)

        def window(volume):
            windows.append(tuple(volume.shape[2:]))
            return predict(volume)

        return window

    monkeypatch.setattr(sliding_window, "window_predictor", counting)
    request = _request((20, 40, 40))
    labels = segment_one_shot(model, **request, threshold=LOWEST_THRESHOLD, window=(20, 24, 24))
    assert labels.shape == (20, 40, 40) and set(np.unique(labels)) <= {1, 3}
    assert len(windows) > 1 and set(windows) == {(20, 24, 24)}


def test_a_class_asked_for_twice_is_segmented_once(monkeypatch) -> None:
    """classes [3, 3] encoded and decoded label 3 twice (two task slots, twice the decoder's work) for the
    same label map."""
    from iris_pipelines.inference import pyfunc_model

    torch.manual_seed(0)
    model = Iris(IrisConfig.tiny()).eval()
    request = _request()
    decoded = []  # the number of task slots of each decoder pass
    real_segment = model.segment

    def segment(query, task):
        decoded.append(task.shape[1])
        return real_segment(query, task)

    monkeypatch.setattr(model, "segment", segment)
    once = pyfunc_model.segment_one_shot(
        model, request["query"], request["reference_image"], request["reference_mask"], classes=[3],
        threshold=LOWEST_THRESHOLD,
    )  # fmt: skip
    twice = pyfunc_model.segment_one_shot(
        model, request["query"], request["reference_image"], request["reference_mask"], classes=[3, 3],
        threshold=LOWEST_THRESHOLD,
    )  # fmt: skip
    np.testing.assert_array_equal(twice, once)
    assert set(decoded) == {1}


def _pyfunc():
    from iris_pipelines.inference.pyfunc_model import IrisPyfuncModel

    torch.manual_seed(0)
    pyfunc = IrisPyfuncModel()
    pyfunc.model = Iris(IrisConfig.tiny()).eval()
    pyfunc.bundle = ModelBundle.from_model(pyfunc.model)
    return pyfunc


def _second_reference() -> tuple[np.ndarray, np.ndarray]:
    """A reference on another grid than the query and the first reference, holding labels 1 and 2 (not 3)."""
    shape = (14, 18, 16)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[3:8, 2:7, 3:9] = 1
    mask[8:13, 10:16, 6:14] = 2
    return np.random.default_rng(1).normal(size=shape).astype(np.float32), mask


def _ensemble_labels(model, query, references, labels, threshold, window) -> np.ndarray:
    """The ensemble computed directly: per-reference class embeddings, their context_ensemble over the
    references that hold each class, the query segmented under it."""
    from iris_pipelines.inference.sliding_window import sliding_window_segment
    from iris_pipelines.inference.strategies import context_ensemble, encode_class_windows, logits_to_labels

    with torch.no_grad():
        pool = torch.zeros(len(references), len(labels), model.config.num_tokens, model.config.embed_dim)
        valid = torch.zeros(len(references), len(labels), dtype=torch.bool)
        for row, (image, mask) in enumerate(references):
            present = [c for c in labels if (mask == c).any()]
            ref = torch.from_numpy(image)[None, None]
            masks = [torch.from_numpy(mask == c)[None, None].float() for c in present]
            if window is None:
                embedding = model.encode_task(ref, torch.cat(masks, dim=1))
            else:
                embedding = encode_class_windows(model, ref, masks, window)
            pool[row, [labels.index(c) for c in present]] = embedding[0]
            valid[row, [labels.index(c) for c in present]] = True
        task = context_ensemble(pool, valid)
        volume = torch.from_numpy(query)[None, None]
        if window is None:
            logits = model.segment(volume, task)
        else:
            logits = sliding_window_segment(model, volume, task, roi_size=window)
        return logits_to_labels(logits.float(), labels, threshold).numpy()


def test_several_references_give_their_per_class_context_ensemble() -> None:
    """reference_image/reference_mask as lists: each class's embedding is the mean over the references that
    hold it (label 3 only the first, 2 only the second, 1 both), as iris segment --strategy ensemble."""
    pyfunc = _pyfunc()
    request = _request()
    second = _second_reference()
    references = [(request["reference_image"], request["reference_mask"]), second]
    several = {
        "query": request["query"],
        "reference_image": [image for image, _ in references],
        "reference_mask": [mask for _, mask in references],
    }
    labels = pyfunc.predict(None, several, params={"threshold": LOWEST_THRESHOLD})
    window = pyfunc.bundle.inference_window()
    expected = _ensemble_labels(
        pyfunc.model, request["query"], references, [1, 2, 3], LOWEST_THRESHOLD, window
    )
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) == {1, 2, 3}  # at the lowest cut every class wins some voxels
    one_shot = pyfunc.predict(None, request, params={"threshold": LOWEST_THRESHOLD})
    assert not np.array_equal(labels, one_shot)  # the second reference changed the result
    from iris_pipelines.inference.pyfunc_model import segment_with_references

    whole = segment_with_references(
        pyfunc.model, request["query"], *zip(*references, strict=True), threshold=LOWEST_THRESHOLD
    )
    expected = _ensemble_labels(pyfunc.model, request["query"], references, [1, 2, 3], LOWEST_THRESHOLD, None)
    np.testing.assert_array_equal(whole, expected)


def test_two_identical_references_give_the_one_shot_result() -> None:
    pyfunc = _pyfunc()
    request = _request()
    one_shot = pyfunc.predict(None, request, params={"threshold": LOWEST_THRESHOLD})
    for pairs in (2, 1):
        several = {
            "query": request["query"],
            "reference_image": [request["reference_image"]] * pairs,
            "reference_mask": (request["reference_mask"],) * pairs,  # a tuple does as well as a list
        }
        labels = pyfunc.predict(None, several, params={"threshold": LOWEST_THRESHOLD})
        np.testing.assert_array_equal(labels, one_shot)


def test_a_class_held_by_the_second_reference_only_is_segmented() -> None:
    pyfunc = _pyfunc()
    request = _request()
    image, mask = _second_reference()
    several = {**request, "reference_image": [request["reference_image"], image]}
    several["reference_mask"] = [request["reference_mask"], mask]
    only_two = pyfunc.predict(None, {**several, "classes": [2]}, params={"threshold": LOWEST_THRESHOLD})
    assert set(np.unique(only_two)) == {2}
    # Label 2 from the second reference's embedding, label 3 from the first's: each class's own holder.
    labels = pyfunc.predict(None, {**several, "classes": [2, 3]}, params={"threshold": LOWEST_THRESHOLD})
    assert set(np.unique(labels)) == {2, 3}
    references = [(request["reference_image"], request["reference_mask"]), (image, mask)]
    window = pyfunc.bundle.inference_window()
    expected = _ensemble_labels(pyfunc.model, request["query"], references, [2, 3], LOWEST_THRESHOLD, window)
    np.testing.assert_array_equal(labels, expected)


def test_bad_reference_lists_are_explained() -> None:
    pyfunc = _pyfunc()
    request = _request()
    image, mask = _second_reference()
    images, masks = [request["reference_image"], image], [request["reference_mask"], mask]
    several = {"query": request["query"], "reference_image": images, "reference_mask": masks}
    with pytest.raises(
        ValueError, match=r"reference_image holds 2 image\(s\) but reference_mask 1 mask\(s\)"
    ):
        pyfunc.predict(None, {**several, "reference_mask": masks[:1]})
    with pytest.raises(ValueError, match="empty lists; give at least one reference pair"):
        pyfunc.predict(None, {**several, "reference_image": [], "reference_mask": []})
    with pytest.raises(ValueError, match="both be single 3-D arrays .* or both lists"):
        pyfunc.predict(None, {**several, "reference_mask": request["reference_mask"]})
    with pytest.raises(ValueError, match=r"reference pair 1: reference_mask\[1\] \(14, 18, 15\) must match"):
        pyfunc.predict(None, {**several, "reference_mask": [masks[0], mask[..., 1:]]})
    nan_image = image.copy()
    nan_image[2, 3, 4] = np.nan
    with pytest.raises(ValueError, match=r"reference_image\[1\] has 1 NaN or infinite voxel\(s\)"):
        pyfunc.predict(None, {**several, "reference_image": [images[0], nan_image]})
    with pytest.raises(ValueError, match="class 4: none of the 2 references holds it"):
        pyfunc.predict(None, {**several, "classes": [1, 4]})
    with pytest.raises(ValueError, match="none of the 2 reference masks has a foreground label"):
        pyfunc.predict(None, {**several, "reference_mask": [np.zeros_like(m) for m in masks]})


def test_a_dataframe_request_may_hold_lists_of_references() -> None:
    """A one-row DataFrame whose reference cells hold lists of arrays, as MLflow's serving layer builds."""
    pyfunc = _pyfunc()
    request = _request()
    image, mask = _second_reference()
    several = {
        "query": request["query"],
        "reference_image": [request["reference_image"], image],
        "reference_mask": [request["reference_mask"], mask],
    }
    expected = pyfunc.predict(None, several, params={"threshold": LOWEST_THRESHOLD})
    frame = pd.DataFrame([several])
    assert isinstance(frame.loc[0, "reference_image"], list)
    np.testing.assert_array_equal(
        pyfunc.predict(None, frame, params={"threshold": LOWEST_THRESHOLD}), expected
    )
    with_classes = pd.DataFrame([{**several, "classes": [2, 3]}])
    labels = pyfunc.predict(None, with_classes, params={"threshold": LOWEST_THRESHOLD})
    assert set(np.unique(labels)) == {2, 3}
    with pytest.raises(ValueError, match="one query per call; got a DataFrame of 2 rows"):
        pyfunc.predict(None, pd.concat([frame, frame], ignore_index=True))
