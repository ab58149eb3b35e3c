"""The framework-free core: adapters, weighting, aggregation, models, storage (no Ray)."""
