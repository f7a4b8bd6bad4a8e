"""Deployment files (Containerfile, Kubernetes manifest) and the sidecar's readiness probe."""
