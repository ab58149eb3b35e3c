"""Per-client personalized inference over HTTP (Ray Serve + FastAPI), from a training run directory."""
