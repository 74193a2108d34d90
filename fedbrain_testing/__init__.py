"""Test and benchmark support that must never reach a hospital: fault injection (processes, network),
the poisoned-update attack filter and the load harness. It lives beside the tests and benchmarks,
outside the installed ``fedbrain`` package: a site's kit cannot name what its fedbrain does not contain.

The POC consortia of the tests and benchmarks admit the attack filter explicitly
(:func:`fedbrain_testing.attack.admit_attack_filter`); no provisioned kit does.
"""
