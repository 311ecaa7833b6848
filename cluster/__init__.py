"""Cluster tooling and the placement controller (issue: multi-node cluster and placement)."""
