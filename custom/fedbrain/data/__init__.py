"""fedbrain.data."""
