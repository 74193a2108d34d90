"""fedbrain.poc."""
