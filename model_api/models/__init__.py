"""The models the server can load: sentence-transformers directories and exported PyTorch programs."""
