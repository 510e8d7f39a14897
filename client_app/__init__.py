"""client_app package."""
