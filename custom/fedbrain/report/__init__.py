"""fedbrain.report."""
