"""model_api: a PyTorch model server speaking the OpenAI embeddings API and KServe v2."""

__version__ = "0.1.0"
