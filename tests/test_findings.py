"""Findings: paired differences over seeds, their 95 % interval, and verdicts that never say more than it allows."""

import itertools
import math

import pandas as pd
import pytest

from hybridat.findings import (CLAIMS, CONSISTENT, NOT_CONSISTENT, UNRESOLVED, Interval, describe, findings,
                               findings_markdown, summary_lines, verdict)
from hybridat.records import _numeric


def test_interval_is_the_t_interval_of_the_paired_differences():
    ci = Interval.of(pd.Series([1.0, 2.0, 3.0]))
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, df=2) * sd 1 / sqrt(3), by hand
    assert (ci.mean, ci.n) == (2.0, 3)
    assert ci.low == pytest.approx(2 - half) and ci.high == pytest.approx(2 + half)
    one = Interval.of(pd.Series([5.0]))
    assert one.n == 1 and one.mean == 5 and math.isnan(one.low)
    assert Interval.of(pd.Series([], dtype=float)).n == 0


@pytest.mark.parametrize("expect,low,high,want", [
    ("same", -1, 1, CONSISTENT), ("same", 2.5, 4, NOT_CONSISTENT), ("same", -4, -2.1, NOT_CONSISTENT),
    ("same", -3, 1, UNRESOLVED), ("same", 1, 3, UNRESOLVED),
    ("more", 0.5, 3, CONSISTENT), ("more", -3, -0.1, NOT_CONSISTENT), ("more", -1, 1, UNRESOLVED),
    ("less", -3, -0.5, CONSISTENT), ("less", 0.2, 3, NOT_CONSISTENT), ("less", -1, 1, UNRESOLVED),
    # on the edges: an interval that reaches 0 from the wrong side excludes the claim; one that touches ±margin from
    # inside is still within it
    ("more", -3, 0.0, NOT_CONSISTENT), ("less", 0.0, 3, NOT_CONSISTENT), ("more", 0.0, 3, UNRESOLVED),
    ("same", -2, 2, CONSISTENT),
])
def test_verdict_rules(expect, low, high, want):
    assert verdict(expect, Interval((low + high) / 2, low, high, 3), margin=2.0) == want


def test_one_seed_never_resolves_anything():
    assert verdict("more", Interval(50.0, math.nan, math.nan, 1), 2.0) == UNRESOLVED


def eval_rows(norm, accs, *, lr=0.1, branch="adv", attack="pgd", eps=8, op="", parent=""):
    """One eval row per seed: accuracy `accs[seed]`, through `branch` under `attack`."""
    return [{"checkpoint_hash": f"{norm}{op}{lr}s{seed}", "parent_hash": parent, "operation": op, "norm": norm,
             "arch": "resnet18", "width": 0.125, "seed": seed, "train_eps": eps, "loss_name": "hybrid",
             "branch": branch, "attack": attack, "eps": eps, "steps": 10 if attack == "pgd" else None,
             "accuracy": acc, "train_lr": lr} for seed, acc in accs.items()]


def frames_of(rows):
    return {"eval": _numeric(pd.DataFrame(rows).astype(str).replace("None", ""))}


def row(found, comparison, metric="adv branch PGD-10"):
    hit = found[(found.comparison == comparison) & (found.metric == metric)]
    assert len(hit) == 1, found[["comparison", "metric"]]
    return hit.iloc[0]


def test_paired_over_common_seeds_only_and_within_one_training():
    rows = (eval_rows("dual-bn", {0: 0.40, 1: 0.42, 2: 0.44, 3: 0.50})
            + eval_rows("dual-ap", {0: 0.405, 1: 0.418, 2: 0.445})  # seed 3 has no pair
            + eval_rows("dual-ns", {0: 0.30, 1: 0.33, 2: 0.335})
            + eval_rows("dual-ap", {0: 0.90, 1: 0.90, 2: 0.90}, lr=0.05))  # another training: never paired with lr 0.1
    found = findings(frames_of(rows))
    assert set(found.training[found.claim != 3]) == {"lr=0.05", "lr=0.1"}  # the NS claim: one group, no NS rows
    mine = found[found.training == "lr=0.1"]
    ap = row(mine, "dual-ap − dual-bn, ε=8")
    assert ap.n == 3 and ap.difference == pytest.approx((0.5 - 0.2 + 0.5) / 3)  # points: +0.5, -0.2, +0.5
    assert ap.verdict == CONSISTENT  # the interval lies within ±2 points
    ns = row(mine, "dual-ns − dual-bn, ε=8")
    assert ns.difference == pytest.approx(-29.5 / 3)  # -10, -9, -10.5: a drop, where the paper saw none at ε 8
    assert (ns.expected, ns.verdict) == ("same", NOT_CONSISTENT)
    assert row(found[found.training == "lr=0.05"], "dual-ap − dual-bn, ε=8").n == 0  # no dual-bn in that training
    # a claim with no data still has its comparison, unresolved, with n = 0
    cross = row(mine, "cross-bn − dual-bn, ε=8")
    assert cross.n == 0 and cross.verdict == UNRESOLVED


def test_dual_ns_is_expected_to_match_dual_bn_at_eps_8_and_to_fall_short_above():
    rows = []
    for eps in (8, 16):
        ns = {0: 0.395, 1: 0.425, 2: 0.435} if eps == 8 else {0: 0.36, 1: 0.37, 2: 0.40}
        for r in eval_rows("dual-bn", {0: 0.40, 1: 0.42, 2: 0.44}, eps=eps) + eval_rows("dual-ns", ns, eps=eps):
            rows.append(r | {"checkpoint_hash": f"{r['checkpoint_hash']}e{eps}"})  # one checkpoint per training
    found = findings(frames_of(rows))
    at8, at16 = row(found, "dual-ns − dual-bn, ε=8"), row(found, "dual-ns − dual-bn, ε=16")
    assert (at8.expected, at8.verdict) == ("same", CONSISTENT)  # -0.5, +0.5, -0.5 points
    assert (at16.expected, at16.verdict) == ("less", CONSISTENT)  # -4, -5, -4 points


def test_swap_ap_compares_the_derived_checkpoint_with_its_parent_seed_by_seed():
    trained = {s: a for s, a in enumerate([0.30, 0.32, 0.31])}
    rows = eval_rows("dual-bn", trained, branch="clean") + eval_rows("dual-bn", {0: 0.5, 1: 0.5, 2: 0.5})
    for s in trained:  # derived: no seed of their own, inherited from the parent
        for branch, acc in (("clean", 0.45 + s / 100), ("adv", 0.10)):
            r = eval_rows("dual-bn", {s: acc}, branch=branch, op='{"op": "swap-ap"}', parent=f"dual-bn0.1s{s}")[0]
            rows.append(r | {"seed": None, "checkpoint_hash": f"swap{s}"})
    found = findings(frames_of(rows))
    gain = row(found, "dual-bn swap-AP − as trained, ε=8", "clean branch PGD-10")
    assert gain.n == 3 and gain.verdict == CONSISTENT and gain.difference == pytest.approx(15)  # +15, +14, +16
    loss = row(found, "dual-bn swap-AP − as trained, ε=8", "adv branch PGD-10")
    assert loss.difference == pytest.approx(-40) and loss.verdict == CONSISTENT  # -40 in every seed


def ns_rows(seed, fixed_adv, fixed_noise, own_adv, layers=20):
    rows = []
    for layer in range(layers):
        for stat in ("mean", "std"):
            for fix, pair, d in ((True, "adv-clean", fixed_adv), (True, "noise-clean", fixed_noise),
                                 (False, "adv-clean", own_adv), (False, "noise-clean", own_adv)):
                rows.append({"checkpoint_hash": f"h{seed}", "seed": seed, "norm": "dual-bn", "kind": "ns",
                             "layer": layer, "layer_name": f"l{layer}", "pair": pair, "statistic": stat,
                             "measure": "wasserstein", "distance": d, "fix_ap": fix,
                             "branch": "adv" if fix else "own", "eps": 16})
    return rows


def test_ns_gap_claims_are_ratios_by_depth():
    rows = ns_rows(0, 0.10, 0.10, 0.40) + ns_rows(1, 0.11, 0.10, 0.50) + ns_rows(2, 0.10, 0.11, 0.45)
    found = findings({"nsgap": _numeric(pd.DataFrame(rows).astype(str))})
    for depth in ("layers 0-6", "layers 7-13", "layers 14-19"):
        r = row(found, "dual-bn fixed AP (adv), ε=16: adv-clean / noise-clean", f"NS gap, {depth}")
        assert r.n == 3 and r.unit == "log2" and abs(r.difference) < 0.1 and r.verdict == CONSISTENT  # within 1.5x
    own = row(found, "dual-bn, ε=16: own-branch / fixed-AP adv-clean", "NS gap, all layers")
    assert 2 ** own.difference == pytest.approx((4 * 4.545 * 4.5) ** (1 / 3), rel=0.01) and own.verdict == CONSISTENT


def test_rendering_shows_data_rows_and_lists_the_rest():
    rows = eval_rows("dual-bn", {0: 0.40, 1: 0.42}) + eval_rows("bn", {0: 0.30, 1: 0.33})
    found = findings(frames_of(rows))
    text = findings_markdown(found)
    assert text.startswith("## Findings") and "| (5) | dual-bn − bn, ε=8 | adv branch PGD-10 | > 0 |" in text
    assert "No data for: (1) cross-bn − dual-bn, ε=8" in text and "—" not in text
    assert "bn TRADES − bn" not in text and "dual-linear − bn" not in text  # variants never run: not listed
    lines = summary_lines(found)
    assert lines[0].startswith("(1) ") and "no comparison" not in lines[0]
    assert any("dual-bn − bn, ε=8, adv branch PGD-10: +9.5 pts [" in line for line in lines)
    assert all(len(line) <= 118 for line in lines)


def test_summary_keeps_each_verdict_on_one_line_with_its_result():
    """A terminal line never breaks a verdict ("-> not" / "resolved at this n"): a result and its verdict, and a
    claim's tally, are read whole, after the text when they fit there, else on a line of their own."""
    found = findings({"nsgap": _numeric(pd.DataFrame(ns_rows(0, 0.1, 0.1, 0.4) + ns_rows(1, 0.1, 0.2, 0.5))
                                        .astype(str))})
    lines = summary_lines(found)
    assert all(len(line) <= 118 for line in lines)
    measured = found[found.n > 0]
    assert sum(" -> " in line for line in lines) == len(measured) > 0
    for _, r in measured.iterrows():
        assert any(line.endswith(f"{describe(r)} -> {r.verdict}") for line in lines)
    for claim, text in CLAIMS.items():
        start = next(i for i, line in enumerate(lines) if line.startswith(f"({claim}) "))
        head = [lines[start], *itertools.takewhile(lambda line: line.startswith(" " * 8), lines[start + 1:])]
        tally = " ".join(line.strip() for line in head).removeprefix(f"({claim}) {text}: ")
        assert tally and ": " not in tally and head[-1].endswith(tally), head


def test_ns_gap_without_fixed_ap_rows_leaves_those_comparisons_empty():
    rows = [r for r in ns_rows(0, 0.1, 0.1, 0.4) + ns_rows(1, 0.1, 0.1, 0.5) if r["fix_ap"] is False]
    found = findings({"nsgap": _numeric(pd.DataFrame(rows).astype(str))})
    three = found[found.claim == 3]
    assert len(three) == 4 and (three.n == 0).all() and (three.verdict == UNRESOLVED).all()


def test_ns_gap_claims_never_mix_protocols_and_follow_the_running_reference():
    """The same checkpoints measured two ways: each protocol is its own group, and with the running NS as the
    reference the claim compares adv-running with noise-running."""
    batch = [r | {"mode": "train", "reference": "batch", "noise_clip": True}
             for r in ns_rows(0, 0.10, 0.10, 0.40) + ns_rows(1, 0.11, 0.10, 0.50)]
    running = [r | {"mode": "eval", "reference": "running", "noise_clip": False,
                    "pair": r["pair"].replace("-clean", "-running"),
                    "distance": r["distance"] * (4 if r["pair"] == "adv-clean" else 1)}
               for r in ns_rows(0, 0.10, 0.10, 0.40) + ns_rows(1, 0.11, 0.10, 0.50)]
    found = findings({"nsgap": _numeric(pd.DataFrame(batch + running).astype(str))})
    three = found[found.claim == 3]
    assert set(three.training) == {"NS mode=train, NS reference=batch, noise clip=true",
                                   "NS mode=eval, NS reference=running, noise clip=false"}
    by = three.set_index(["training", "comparison", "metric"])
    same = by.loc[("NS mode=train, NS reference=batch, noise clip=true",
                   "dual-bn fixed AP (adv), ε=16: adv-clean / noise-clean", "NS gap, layers 0-6")]
    four = by.loc[("NS mode=eval, NS reference=running, noise clip=false",
                   "dual-bn fixed AP (adv), ε=16: adv-running / noise-running", "NS gap, layers 0-6")]
    assert same.n == four.n == 2 and abs(same.difference) < 0.1 and four.difference > 1.9  # log2(4 x ...)


def test_summary_names_what_has_no_data_per_protocol_and_never_counts_it_as_measured():
    """Eval rows of one training, NS rows measured in two protocols (eval mode: own branch only). Accuracy claims are
    judged once (the NS protocols are no trainings of the eval rows); a claim without data says "no data" (not "1
    not resolved"); a comparison missing in one protocol is listed under that protocol's label, never bare next to
    the same comparison measured in the other."""
    rows = eval_rows("dual-bn", {0: 0.40, 1: 0.42}) + eval_rows("bn", {0: 0.30, 1: 0.33})
    batch = [r | {"mode": "train", "reference": "batch", "noise_clip": True}
             for r in ns_rows(0, 0.10, 0.10, 0.40) + ns_rows(1, 0.11, 0.10, 0.50)]
    own_eval = [r | {"mode": "eval", "reference": "batch", "noise_clip": True}
                for r in ns_rows(0, 0.10, 0.10, 0.40) + ns_rows(1, 0.11, 0.10, 0.50) if not r["fix_ap"]]
    frames = frames_of(rows) | {"nsgap": _numeric(pd.DataFrame(batch + own_eval).astype(str))}
    found = findings(frames)
    assert set(found.training[found.claim != 3]) == {""}  # no accuracy rows under an NS protocol's label
    lines = "\n".join(summary_lines(found)).replace("\n        ", " ")
    claim = {int(line[1]): line for line in lines.splitlines() if line.startswith("(")}
    assert claim[1].endswith(": no data") and claim[5].endswith(": 1 consistent")
    assert claim[3].endswith(" at this n, 4 without data")  # the 4 NS comparisons of the eval protocol
    missing = next(line for line in lines.splitlines() if "no data for: [NS mode=eval" in line)
    entries = missing.split("no data for: ")[1].split("; ")
    assert entries and all(e.startswith("[NS mode=eval] ") for e in entries)
    assert "adv-clean / noise-clean" in missing  # whole words: no break at a hyphen


def test_ns_gap_depth_thirds_follow_the_measured_layers():
    """A WideResNet-34-10 has 31 norm layers: the three depth groups split 0-30 (11, 10, 10 layers), so an adv-clean
    gap 4x the noise-clean one in the deepest layers is seen (the groups were ResNet-18's 0-19 whatever the model)."""
    rows = []
    for seed in (0, 1, 2):
        for r in ns_rows(seed, 0.10, 0.10, 0.40, layers=31):
            deep_adv = r["fix_ap"] and r["pair"] == "adv-clean" and r["layer"] >= 21
            rows.append(r | {"distance": r["distance"] * (4 + seed / 10) if deep_adv else r["distance"]})
    found = findings({"nsgap": _numeric(pd.DataFrame(rows).astype(str))})
    depth = found[found.metric.str.startswith("NS gap, layers")]
    assert list(depth.metric) == ["NS gap, layers 0-10", "NS gap, layers 11-20", "NS gap, layers 21-30"]
    assert list(depth.verdict) == [CONSISTENT, CONSISTENT, NOT_CONSISTENT]
    assert 2 ** depth.difference.iloc[2] == pytest.approx(4.1, rel=0.01)


def test_pairs_are_matched_by_seed_not_by_row_order():
    """A seed missing in the middle and rows in another order: each difference is still of one seed's two models."""
    rows = (eval_rows("dual-bn", {3: 0.50, 2: 0.44, 1: 0.42, 0: 0.40})  # rows of seeds 3, 2, 1, 0
            + eval_rows("dual-ap", {0: 0.41, 2: 0.45, 3: 0.53}))  # seed 1 never ran
    ap = row(findings(frames_of(rows)), "dual-ap − dual-bn, ε=8")
    want = Interval.of(pd.Series([1.0, 1.0, 3.0]))  # seeds 0, 2, 3: +1, +1, +3 points
    assert ap.n == 3 and ap.difference == pytest.approx(want.mean)
    assert (ap.ci_low, ap.ci_high) == (pytest.approx(want.low), pytest.approx(want.high))
