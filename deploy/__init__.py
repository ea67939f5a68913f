"""Deploying the served models beyond one machine: Kubernetes manifests and a local rehearsal."""
