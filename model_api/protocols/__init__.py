"""The wire protocols: OpenAI embeddings (`/v1`) and the Open Inference Protocol, KServe v2 (`/v2`)."""
