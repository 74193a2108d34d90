"""Poisoned updates in a real POC (FLARE server + 3 site processes, mTLS kits, admin API).

Three segmentation jobs of the shared POC's first wave (tests/poc_shared.py; FLARE runs them side
by side with the other modules' first jobs), same data, same seed:

1. clean: FedAvg, guard on (the default), no attack;
2. guarded: hospital-b multiplies its update by 100 (fault injection filter); guard on;
3. plain: the same attack with ``--no-guard`` (FLARE's FedAvg arithmetic, unscreened), one round.

The guard must refuse hospital-b every round (its record is in the downloaded result), flag it
after guard_flag_after rounds, and keep the final Dice near the clean run's; plain FedAvg must
degrade.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedbrain.contracts import GUARD_FILE
from fedbrain.report.job_report import build_report, render_markdown
from poc_shared import SEG_ROUNDS as ROUNDS
from poc_shared import ATTACKER

pytestmark = pytest.mark.poc

#: The test's jobs are tiny (3 rounds, 2 validation cases per site): "near the clean run" is judged
#: loosely here; bench/attacks.py measures the issue's 0.02 on larger jobs.
NEAR = 0.08
DEGRADED = 0.1


@pytest.fixture(scope="module")
def attack_jobs(first_wave):
    """The three jobs ran side by side in the shared POC's first wave (same data, same seed)."""
    results = {name: first_wave[f"attack_{name}"] for name in ("clean", "guarded", "plain")}
    yield {"results": results, "reports": {n: build_report(r) for n, (_, r, _) in results.items() if r}}


def _guard_records(result: Path) -> list[dict]:
    path = Path(result) / "workspace" / GUARD_FILE
    assert path.is_file(), f"no {GUARD_FILE} in the downloaded result {result}"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _final_dice(report: dict) -> float:
    values = [e["final"].get("val_dice") for e in report["sites"].values()]
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if len(values) == len(report["sites"]) else 0.0  # no Dice: the model broke


def test_all_three_jobs_completed(attack_jobs):
    for name, (meta, _, _) in attack_jobs["results"].items():
        assert meta["status"] == "FINISHED:COMPLETED", (name, meta.get("status"))


def test_the_guard_refused_the_x100_site_every_round_and_flagged_it(attack_jobs):
    records = _guard_records(attack_jobs["results"]["guarded"][1])
    assert [r["round"] for r in records] == list(range(ROUNDS))
    for r in records:
        assert list(r["refused"]) == [ATTACKER], r
        assert "x the round's median" in r["refused"][ATTACKER]
        assert sorted(r["accepted"]) == ["hospital-a", "hospital-c"]
    assert [r["flagged"] for r in records] == [[], [ATTACKER], [ATTACKER]]
    server_log = (Path(attack_jobs["results"]["guarded"][1]) / "workspace" / "log.txt").read_text(errors="replace")
    assert f"update guard: round 0: refused {ATTACKER}: update norm" in server_log
    assert "names and shapes are not checked" not in server_log  # the global model was there to compare with


def test_the_clean_run_refused_nobody(attack_jobs):
    assert all(r["refused"] == {} for r in _guard_records(attack_jobs["results"]["clean"][1]))


def test_the_report_shows_refusals_and_the_flag(attack_jobs):
    report = attack_jobs["reports"]["guarded"]
    assert [(r["round"], r["site"]) for r in report["guard"]["refusals"]] == [(i, ATTACKER) for i in range(ROUNDS)]
    assert report["guard"]["flagged"] == {ATTACKER: 1}
    md = render_markdown(report, [])
    assert "## Update guard and aggregation" in md and f"{ATTACKER} flagged" in md


def test_guarded_dice_stays_near_clean_while_plain_fedavg_degrades(attack_jobs):
    clean, guarded, plain = (_final_dice(attack_jobs["reports"][n]) for n in ("clean", "guarded", "plain"))
    assert clean > 0.15, f"the clean run did not learn (Dice {clean:.3f}): the comparison would mean nothing"
    assert abs(guarded - clean) < NEAR, (clean, guarded)
    assert plain < clean - DEGRADED, (clean, plain)
