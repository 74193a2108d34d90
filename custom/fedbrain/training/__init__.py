"""fedbrain.training."""
