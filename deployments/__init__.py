"""Ray Serve applications and ingress (issue: serving path)."""
