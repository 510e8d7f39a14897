"""model_api package."""
