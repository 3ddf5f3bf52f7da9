"""Thin py-libp2p wiring shared by the CPM node and the daemon.

Everything protocol-shaped lives in ``protocol`` (sans-IO); this package only turns a
libp2p stream into frames and builds hosts that speak *only* Noise + yamux.
"""
