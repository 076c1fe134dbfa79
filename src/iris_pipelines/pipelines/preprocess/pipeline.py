"""``kedro run --pipelines=preprocess``."""

from kedro.pipeline import Node, Pipeline

from .nodes import preprocess_volumes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=preprocess_volumes,
                inputs=["case_manifest", "params:preprocess"],
                outputs=["preprocessed_manifest", "preprocess_report"],
                name="preprocess_volumes",
            )
        ]
    )
