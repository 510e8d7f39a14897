"""The admin dashboard's static files (index.html, dashboard.css, dashboard.js), served by `server.py`."""
