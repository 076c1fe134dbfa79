"""``kedro run --pipelines=evaluate``: every inference strategy and both baselines on the test episodes."""

from kedro.pipeline import Node, Pipeline

from .nodes import evaluate_strategies, record_evaluation_inputs, report_evaluation


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=evaluate_strategies,
                inputs=[
                    "iris_model",
                    "registered_model",
                    "task_embeddings",
                    "episode_index",
                    "preprocessed_manifest",
                    "params:evaluate",
                ],
                outputs="evaluation_metrics",
                name="evaluate_strategies",
            ),
            Node(
                func=report_evaluation,
                inputs=["evaluation_metrics", "registered_model"],
                outputs=[
                    "evaluation_summary",
                    "evaluation_by_dataset",
                    "evaluation_report",
                    "evaluation_dice_boxplot",
                    "evaluation_class_dice",
                ],
                name="report_evaluation",
            ),
            Node(
                func=record_evaluation_inputs,
                inputs=["episode_index", "preprocessed_manifest", "task_embeddings", "params:evaluate"],
                outputs=None,
                name="record_evaluation_inputs",
            ),
        ]
    )
