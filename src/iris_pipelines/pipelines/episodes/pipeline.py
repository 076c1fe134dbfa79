"""``kedro run --pipelines=episodes``."""

from kedro.pipeline import Node, Pipeline

from .nodes import build_episode_index


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=build_episode_index,
                inputs=["preprocessed_manifest", "params:episodes"],
                outputs="episode_index",
                name="build_episode_index",
            )
        ]
    )
