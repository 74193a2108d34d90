"""Running fedbrain for real: provisioning (site policies, signed kit manifest), kit checks."""
