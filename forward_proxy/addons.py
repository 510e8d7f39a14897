"""`addons = [...]`: the one list of the project's mitmproxy addons.

Both `forward-proxy run` and mitmproxy's own tools load it:

    mitmdump -s forward_proxy/addons.py --set cache_ttl=30m

Order matters, each hook runs through the list in turn: privacy and policy addons first (they may
refuse or rewrite a request before it is looked up), then the cache, then statistics and the access log
(they read what the cache decided, from `flow.metadata`).
"""

from __future__ import annotations

from forward_proxy.cache.addon import Cache
from forward_proxy.cache.https import HttpsInterception
from forward_proxy.policy.addon import ClientAccess, EgressGuard
from forward_proxy.policy.connections import ConnectionLimit
from forward_proxy.privacy.addon import Privacy
from forward_proxy.protocolerrors import ProtocolErrors
from forward_proxy.sockets import Sockets
from forward_proxy.stats.accesslog import AccessLog
from forward_proxy.stats.admin import AdminListener

addons: list[object] = [
    Sockets(),  # TCP_NODELAY and quick ACKs on every connection: no 40 ms delayed-ACK stall
    ProtocolErrors(),  # mitmproxy's own refusals (malformed requests, body_size_limit) as JSON errors
    ClientAccess(),  # who may connect (allow_clients); proxy auth failures as JSON
    ConnectionLimit(),  # how many may be connected at once (max_client_connections)
    EgressGuard(),  # where the proxy may connect (egress_*); pins each flow to the checked address
    Privacy(),  # masks identity headers, adds the pseudonym, keeps addresses out of the logs
    HttpsInterception(),
    Cache(),
    # statistics / access log addons go here (issue 5)
    AdminListener(),
    AccessLog(),
]
