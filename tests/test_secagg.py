"""Pairwise-masking secure aggregation (fedbrain.secagg), run in process with real X25519 keys, certificates
from a real root CA, Shamir shares and ChaCha20 masks: the sum is exact, a masked update looks uniform, a
lost site costs nothing, a swapped key or too few survivors stop the round with one line."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedbrain.secagg import shamir
from fedbrain.secagg.masking import VALUE_BOUND, WEIGHT_CAP, decode, encode, flatten, prg, unflatten
from fedbrain.secagg.protocol import Identity, SecAggError, ServerSecAgg, SiteSecAgg, threshold_for
from fedbrain_testing import pki

JOB = "job-1"


@pytest.fixture(scope="module")
def consortium():
    """A root CA and one identity per site, like a provisioned kit's startup/; and a foreign CA."""
    out = pki.consortium([f"hospital-{i:02d}" for i in range(12)])
    other_ca = pki.new_key()
    out["_foreign_root"] = pki.certificate("other-ca", other_ca, "other-ca", other_ca, ca=True)
    out["_foreign_key"] = other_ca
    return out


def _setup(identities, rounds=(0, 1, 2), tamper=None, lost_before_sharing=()):
    sites = {i.name: SiteSecAgg(i, JOB, list(rounds)) for i in identities}
    server = ServerSecAgg(JOB)
    ads = [s.advertise() for s in sites.values()]
    if tamper:
        ads = tamper(ads)
    t = server.setup(ads)
    sharing = {n: s for n, s in sites.items() if n not in lost_before_sharing}
    routed = server.route({n: s.share(ads, t) for n, s in sharing.items()})
    for n, s in sharing.items():
        s.receive(routed[n], server.members)
    return sharing, server


def _round(sites, server, updates, round_no, senders, steps=None):
    """One round: each sender encodes (weighted by its steps) and masks; the server adds, asks, unmasks."""
    steps = steps or {n: 1 for n in senders}
    n = len(server.members)
    masked = {s: sites[s].mask(encode(updates[s], steps[s], n)[0], round_no) for s in senders}
    total = np.zeros(next(iter(updates.values())).size, np.uint32)
    for y in masked.values():
        total += y
    answers = {s: sites[s].unmask_shares(round_no, list(senders), [m for m in server.members if m not in senders])
               for s in senders}
    return decode(server.unmask(total, round_no, list(senders), answers), sum(steps.values()), n), masked


def _close(total, expected, n_sites):
    """Within the fixed point's resolution: one step of 2**-19 (3 sites) .. 2**-17 (12) per site."""
    return np.max(np.abs(total - expected)) <= n_sites * 2.0 ** -15


def _names(consortium, n):
    return [consortium[f"hospital-{i:02d}"] for i in range(n)]


def test_shamir_any_t_shares_rebuild_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, 5, 3)
    assert shamir.combine(shares[2:], 3) == secret and shamir.combine([shares[0], shares[4], shares[2]], 3) == secret
    with pytest.raises(shamir.ShamirError):
        shamir.combine(shares[:2], 3)
    assert shamir.combine(shares[:2] + [(shares[2][0], shares[2][1] + 1)], 3) != secret


def test_the_weighted_average_survives_the_ring_within_its_resolution():
    """Weighted by steps as plaintext FedAvg weighs; the fixed point's error is far below a round's update."""
    rng = np.random.default_rng(0)
    xs = [rng.normal(0, 0.05, 10_000) for _ in range(12)]
    steps = [int(s) for s in rng.integers(1, 300, 12)]
    encoded = [encode(x, s, 12, rng=rng) for x, s in zip(xs, steps)]
    ring = sum(e[0] for e in encoded)  # uint32 wraps: the ring
    weights = [e[1] for e in encoded]
    assert weights == [min(s, WEIGHT_CAP) for s in steps]
    expected = np.sum([w * x for w, x in zip(weights, xs)], axis=0) / sum(weights)
    assert np.max(np.abs(decode(ring, sum(weights), 12) - expected)) < 1e-6
    big, _, clipped = encode(np.array([100.0, -100.0, 0.5]), 1, 3)
    assert clipped == 2 and decode(big, 1, 3)[0] == VALUE_BOUND


def test_flatten_round_trips_a_state_dict():
    arrays = {"b": np.ones((2, 3), np.float32), "a": np.arange(4, dtype=np.float32), "c": np.float32(2.0)}
    vector, layout = flatten(arrays)
    back = unflatten(vector, layout)
    assert [name for name, _ in layout] == ["a", "b", "c"]
    assert all(np.array_equal(back[k], np.asarray(v)) for k, v in arrays.items())


@pytest.mark.parametrize("n", [3, 12])
def test_the_server_gets_the_exact_sum_and_nothing_else(consortium, n):
    sites, server = _setup(_names(consortium, n))
    assert server.threshold == threshold_for(n)
    rng = np.random.default_rng(n)
    updates = {name: rng.normal(0, 0.01, 5000) for name in sites}
    for round_no in (0, 1):
        total, masked = _round(sites, server, updates, round_no, list(sites))
        assert _close(total, np.mean(list(updates.values()), axis=0), n)
        # what the server holds of one site looks uniform on the ring and tells nothing of its update
        one = masked[sorted(sites)[0]]
        counts = np.bincount((one >> 28).astype(np.int64), minlength=16)
        assert stats.chisquare(counts).pvalue > 1e-3
        assert abs(np.corrcoef(one.astype(np.float64), updates[sorted(sites)[0]])[0, 1]) < 0.1


def test_masks_are_fresh_each_round(consortium):
    sites, _ = _setup(_names(consortium, 3))
    site = sites["hospital-00"]
    zero = np.zeros(1000, np.uint32)
    assert not np.array_equal(site.mask(zero, 0), site.mask(zero, 1))


def test_a_site_lost_after_sharing_costs_nothing(consortium):
    """hospital-02 shared, then died before its masked update: the round completes with the other sites."""
    sites, server = _setup(_names(consortium, 5))
    rng = np.random.default_rng(1)
    updates = {name: rng.normal(0, 0.01, 3000) for name in sites}
    senders = [s for s in sites if s != "hospital-02"]
    total, _ = _round(sites, server, updates, 1, senders)
    assert _close(total, np.mean([updates[s] for s in senders], axis=0), 5)
    # a later round without it: its key is known, so no site reveals its self-mask ever again
    total, _ = _round(sites, server, updates, 2, senders)
    assert _close(total, np.mean([updates[s] for s in senders], axis=0), 5)
    with pytest.raises(SecAggError, match="mask keys revealed in an earlier round"):
        sites["hospital-00"].unmask_shares(0, list(sites), [])


def test_a_site_lost_before_sharing_is_outside_the_group(consortium):
    sites, server = _setup(_names(consortium, 4), lost_before_sharing=("hospital-03",))
    assert server.members == ["hospital-00", "hospital-01", "hospital-02"]
    rng = np.random.default_rng(2)
    updates = {name: rng.normal(0, 0.01, 100) for name in sites}
    total, _ = _round(sites, server, updates, 0, list(sites))
    assert _close(total, np.mean(list(updates.values()), axis=0), 3)


def test_too_few_survivors_reveal_nothing(consortium):
    sites, server = _setup(_names(consortium, 5))  # threshold 3
    with pytest.raises(SecAggError, match="fewer than the threshold 3: nothing revealed"):
        sites["hospital-00"].unmask_shares(0, ["hospital-00", "hospital-01"], ["hospital-02", "hospital-03",
                                                                                "hospital-04"])
    with pytest.raises(SecAggError, match="fewer than the threshold 3: the sum stays masked"):
        server.unmask(np.zeros(4, np.uint32), 0, ["hospital-00", "hospital-01"], {})


def test_a_server_never_gets_both_masks_of_one_site(consortium):
    sites, _ = _setup(_names(consortium, 3))
    a = sites["hospital-00"]
    with pytest.raises(SecAggError, match="both as having sent and not"):
        a.unmask_shares(0, ["hospital-00", "hospital-01", "hospital-02"], ["hospital-02"])
    a.unmask_shares(0, ["hospital-00", "hospital-01", "hospital-02"], [])
    with pytest.raises(SecAggError, match="asked again with other lists"):
        a.unmask_shares(0, ["hospital-00", "hospital-01"], ["hospital-02"])


def test_a_swapped_key_is_detected_by_the_sites(consortium):
    def swap(ads):
        forged = SiteSecAgg(consortium["hospital-01"], JOB, [0]).advertise()  # fresh keys the server made up...
        ads[1] = {**ads[1], "s_pk": forged["s_pk"]}  # ...put in place of hospital-01's, its signature kept
        return ads

    with pytest.raises(SecAggError, match="do not carry its signature: the server .* changed them"):
        _setup(_names(consortium, 3), tamper=swap)


def test_a_certificate_from_another_ca_or_name_is_refused(consortium):
    foreign = Identity("hospital-01", consortium["_foreign_key"],
                       pki.certificate("hospital-01", consortium["_foreign_key"], "other-ca", consortium["_foreign_key"]),
                       consortium["_foreign_root"])

    def outsider(ads):
        ads[1] = SiteSecAgg(foreign, JOB, [0]).advertise()
        return ads

    with pytest.raises(SecAggError, match="not issued by this consortium's root CA"):
        _setup(_names(consortium, 3), tamper=outsider)

    def renamed(ads):
        ads[1] = {**ads[1], "site": "hospital-99"}
        return ads

    with pytest.raises(SecAggError, match="issued to 'hospital-01'"):
        _setup(_names(consortium, 3), tamper=renamed)


def test_prg_is_a_deterministic_stream_per_seed_and_round():
    seed = bytes(32)
    assert np.array_equal(prg(seed, 3, 100), prg(seed, 3, 100))
    assert not np.array_equal(prg(seed, 3, 100), prg(seed, 4, 100))
    assert np.array_equal(prg(seed, 3, 100), prg(seed, 3, 200)[:100])


def test_a_threshold_below_a_majority_is_refused_by_every_site(consortium):
    """A server that asks for shares with a low threshold (so that fewer sites, or itself with one, could unmask)."""
    sites = {i.name: SiteSecAgg(i, JOB, [0]) for i in _names(consortium, 5)}
    ads = [s.advertise() for s in sites.values()]
    with pytest.raises(SecAggError, match="at least 3 of them must be needed to unmask"):
        sites["hospital-00"].share(ads, 2)


def test_each_job_gets_fresh_key_pairs(consortium):
    """Key-agreement pairs are made per job (per SiteSecAgg): the same site in two jobs advertises other keys."""
    site = consortium["hospital-00"]
    first, second = SiteSecAgg(site, "job-1", [0]).advertise(), SiteSecAgg(site, "job-2", [0]).advertise()
    assert first["c_pk"] != second["c_pk"] and first["s_pk"] != second["s_pk"]  # encryption and masking keys
