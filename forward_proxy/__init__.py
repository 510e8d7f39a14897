"""forward_proxy package."""
