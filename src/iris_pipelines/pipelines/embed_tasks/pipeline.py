"""``kedro run --pipelines=embed_tasks``: task embeddings per dataset × class from the trained model."""

from kedro.pipeline import Node, Pipeline

from .nodes import embed_tasks


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=embed_tasks,
                inputs=[
                    "iris_model",
                    "registered_model",
                    "episode_index",
                    "preprocessed_manifest",
                    "params:embed_tasks",
                ],
                outputs="task_embeddings",
                name="embed_tasks",
            )
        ]
    )
