"""The FLARE side of fedbrain: site settings, the one site loop, the personal-part store, exchange helpers."""
