"""Data side of shapeflow: preprocessing (meshes -> shards) and the streaming loader (shards -> batches).

``make_loader`` is imported lazily so that ``import data_pipeline.schema`` (used by the
preprocessing workers) does not pull in torch.
"""


def __getattr__(name: str):
    if name == "make_loader":
        from data_pipeline.loading.loader import make_loader
        return make_loader
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")


__all__ = ["make_loader"]
