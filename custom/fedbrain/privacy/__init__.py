"""Differential privacy: sample-level DP-SGD (a hook of the one training loop), the site's
accountant store and lifetime budget, and client-level DP on outgoing updates (FLARE filters).

Why its own package: privacy is decided by the hospital (budget, require_dp in its local
settings) as much as by the job (noise, clipping in the task config); both meet here.
"""
