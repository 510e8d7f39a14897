"""Storage behind one small interface (`base.py`): cache entries and shared counters.

`disk.py` keeps both in diskcache under the cache directory; a Redis backend implements the same
protocols. The cache (`forward_proxy.cache`) and the statistics (`forward_proxy.stats`) use these
interfaces and never each other's insides.
"""
