"""A `socketserver` server serving in a thread of its own: what each loopback test server runs on.

serving = ServedInThread(server)   # serves until
serving.stop()                     # stops listening, closes the socket, joins the thread
"""

from __future__ import annotations

import socketserver
import threading


class ServedInThread:
    def __init__(self, server: socketserver.BaseServer) -> None:
        self.server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)
