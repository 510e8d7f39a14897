"""Root test configuration shared by both environments (imports neither mitmproxy nor torch)."""
