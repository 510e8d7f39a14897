"""The response cache: pure decisions (canonical, keys, policy, rules, versions, singleflight) and the addon."""
