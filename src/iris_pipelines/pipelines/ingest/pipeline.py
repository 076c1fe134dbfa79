"""The ``ingest`` pipeline: phantom collection (optional) → checked ``case_manifest`` + ``ingest_report``."""

from kedro.pipeline import Node, Pipeline

from .nodes import generate_phantom_collection, ingest_cases


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                generate_phantom_collection,
                inputs="params:phantoms",
                outputs="phantom_sources",
                name="generate_phantom_collection",
            ),
            Node(
                ingest_cases,
                inputs=["phantom_sources", "params:ingest"],
                outputs=["case_manifest", "ingest_report"],
                name="ingest_cases",
            ),
        ]
    )
