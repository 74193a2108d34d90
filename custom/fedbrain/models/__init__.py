"""fedbrain.models."""
