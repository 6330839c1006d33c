"""The engine: plans that compute many penalties at once."""
