"""Code every layer may use (models, data_pipeline, trainer); imports nothing from the project."""
