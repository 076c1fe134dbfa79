"""``kedro run --pipelines=train``: train Iris on the episode index, then register it in MLflow."""

from kedro.pipeline import Node, Pipeline

from .nodes import register_model, train_iris


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=train_iris,
                inputs=[
                    "episode_index",
                    "preprocessed_manifest",
                    "params:model",
                    "params:train",
                    "params:preprocess",
                ],
                outputs=["iris_model", "training_history"],
                name="train_iris",
            ),
            Node(
                # All resolved parameters, not only params:train: they are logged next to the model.
                func=register_model,
                inputs=["iris_model", "episode_index", "preprocessed_manifest", "parameters"],
                outputs="registered_model",
                name="register_model",
            ),
        ]
    )
