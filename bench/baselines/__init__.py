"""Peer systems the benchmark runs side by side with this project's app."""
