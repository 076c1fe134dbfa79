"""``kedro run --pipelines=tsne``: a 2-D map of the task embeddings by dataset and class."""

from kedro.pipeline import Node, Pipeline

from .nodes import map_task_embeddings, plot_task_embeddings


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=map_task_embeddings,
                inputs=["task_embeddings", "params:tsne"],
                outputs="tsne_coordinates",
                name="map_task_embeddings",
            ),
            Node(
                func=plot_task_embeddings,
                inputs="tsne_coordinates",
                outputs=["tsne_plot", "tsne_interactive"],
                name="plot_task_embeddings",
            ),
        ]
    )
