"""The explorer on Ray Serve (optional: `pip install -r requirements-cluster.txt`): replicas of each
model with cache affinity, health checks and autoscaling, and jobs that every replica answers
through Redis. The only package that imports Ray or Redis; the single server never imports it.
`python -m explorer.cluster --help`; README, "Serving at scale"."""
