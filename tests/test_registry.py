"""The champion/challenger rule: first on plain values, then on a real local MLflow registry."""

from __future__ import annotations

import pytest

from azdistill.evaluation.promotion import failed_check_descriptions
from azdistill.evaluation.report import PromotionCheck
from azdistill.tracking.registry import (
    CHAMPION_ALIAS,
    PromotionDecision,
    apply_promotion,
    champion_version,
    decide,
    metric_from_tags,
)

# ---------------------------------------------------------------------------------------------------
# The rule alone


def test_a_better_challenger_that_passed_the_checks_is_promoted():
    decision = decide("3", "agreement", 0.86, [], champion_version="2", champion_value=0.81)
    assert decision.promoted and decision.decision == "champion"
    assert decision.reason == "agreement 0.86 beats champion version 2 (0.81)"


def test_a_worse_challenger_is_kept_and_says_why():
    decision = decide("3", "agreement", 0.78, [], champion_version="2", champion_value=0.81)
    assert not decision.promoted and decision.decision == "challenger"
    assert decision.reason == "agreement 0.78 does not beat champion version 2 (0.81)"


def test_a_tie_keeps_the_champion():
    assert not decide("3", "agreement", 0.81, [], "2", 0.81).promoted


def test_a_better_challenger_that_failed_a_check_is_rejected_with_the_failed_checks():
    decision = decide("3", "agreement", 0.95, ["latency_ratio 0.9 > 0.5"], champion_version="2", champion_value=0.81)
    assert not decision.promoted and decision.decision == "rejected"
    assert decision.reason == "failed the promotion checks: latency_ratio 0.9 > 0.5"
    # It was never measured against the champion, so no tag says it was.
    assert decision.version_tags() == {
        "promotion.decision": "rejected", "promotion.reason": decision.reason, "promotion.metric": "agreement",
    }


def test_the_first_version_becomes_champion_only_if_it_passed_the_checks():
    first = decide("1", "agreement", 0.7, [], None, None)
    assert first.promoted and first.reason == "first version to pass the promotion checks (agreement 0.7)"
    # A lone first version that fails the checks is rejected, not a challenger: there is nothing it challenges.
    failed = decide("1", "agreement", 0.7, ["agreement 0.7 < 0.8"], None, None)
    assert not failed.promoted and failed.decision == "rejected"
    assert failed.run_tags()["azdistill.promotion"] == "rejected"


def test_without_the_metric_nothing_is_compared():
    missing = decide("3", "accuracy", None, [], "2", 0.8)
    assert not missing.promoted and missing.reason.startswith("no accuracy was measured for this version")
    assert missing.decision == "challenger"  # it passed the checks: not rejected, just not comparable
    champion_lacks_it = decide("3", "accuracy", 0.9, [], "2", None)
    assert not champion_lacks_it.promoted and champion_lacks_it.decision == "challenger"
    assert "champion version 2 has no recorded accuracy" in champion_lacks_it.reason


def test_the_champion_itself_stays_champion():
    decision = decide("2", "agreement", 0.81, [], "2", None)
    assert decision.promoted and decision.reason.startswith("already the champion")


def test_failed_checks_read_as_the_comparison_that_did_not_hold():
    checks = [
        PromotionCheck("agreement", 0.7123, 0.8, ">=", False),
        PromotionCheck("latency_ratio", 0.3, 0.5, "<=", True),
        PromotionCheck("beats_baseline_accuracy", 0.4, 0.45, ">", False),
    ]
    assert failed_check_descriptions(checks) == ["agreement 0.7123 < 0.8", "beats_baseline_accuracy 0.4 <= 0.45"]


def test_metric_tags_that_are_missing_or_not_numbers_count_as_absent():
    assert metric_from_tags({"metric.agreement": "0.8125"}, "agreement") == 0.8125
    assert metric_from_tags({}, "agreement") is None
    assert metric_from_tags({"metric.agreement": "nan"}, "agreement") is None
    assert metric_from_tags({"metric.agreement": "high"}, "agreement") is None


def test_the_console_line_says_what_the_version_is_now():
    assert decide("3", "agreement", 0.86, [], "2", 0.81).summary() == (
        "version 3 is the champion: agreement 0.86 beats champion version 2 (0.81)")
    assert decide("3", "agreement", 0.78, [], "2", 0.81).summary() == (
        "version 3 stays a challenger (champion: version 2): agreement 0.78 does not beat champion version 2 (0.81)")
    assert decide("1", "agreement", 0.767, ["agreement 0.767 < 0.8"], None, None).summary() == (
        "version 1 is rejected, so there is no champion yet: failed the promotion checks: agreement 0.767 < 0.8")
    assert decide("4", "agreement", 0.9, ["latency_ratio 0.9 > 0.5"], "2", 0.81).summary() == (
        "version 4 is rejected (champion: version 2 stays): failed the promotion checks: latency_ratio 0.9 > 0.5")
    assert decide("1", "agreement", None, [], None, None).summary() == (
        "version 1 stays a challenger (there is no champion yet): no agreement was measured for this version, so it "
        "cannot be compared with a champion")


def test_decision_tags():
    decision = PromotionDecision("3", False, "why", "agreement", 0.7, "2", 0.8)
    assert decision.version_tags() == {
        "promotion.decision": "challenger", "promotion.reason": "why", "promotion.metric": "agreement",
        "promotion.compared_with": "2",
    }
    assert decision.run_tags() == {
        "azdistill.registered_version": "3", "azdistill.promotion": "challenger", "azdistill.promotion.reason": "why",
    }


# ---------------------------------------------------------------------------------------------------
# On a local MLflow registry, through the Tracker as `azdistill run` uses it


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Three retrains: v1 passes and becomes champion, v2 is better and takes over, v3 is worse and stays out."""
    from mlflow import MlflowClient
    from retrains import record_retrain

    workdir = tmp_path_factory.mktemp("registry")
    outcomes = [record_retrain(workdir, str(index), agreement, accuracy)
                for index, (agreement, accuracy) in enumerate([(0.70, 0.84), (0.85, 0.86), (0.78, 0.88)], start=1)]
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    return client, outcomes, workdir


def test_a_better_retrain_takes_the_champion_alias(registry):
    client, outcomes, _ = registry
    (_, first, _), (_, second, _), _ = outcomes
    assert first.promoted and first.champion_version is None
    assert second.promoted and second.champion_version == "1"
    assert str(client.get_model_version_by_alias("sentiment-student", CHAMPION_ALIAS).version) == "2"
    former = client.get_model_version("sentiment-student", "1")
    assert former.tags["promotion.replaced_by"] == "2"
    winner = client.get_model_version("sentiment-student", "2")
    assert winner.tags["promotion.reason"] == "agreement 0.85 beats champion version 1 (0.7)"
    assert winner.tags["promotion.decision"] == "champion"


def test_a_worse_retrain_stays_registered_as_challenger_with_its_reason(registry):
    client, outcomes, _ = registry
    run_id, third, _ = outcomes[2]
    assert not third.promoted
    loser = client.get_model_version("sentiment-student", "3")
    assert loser.run_id == run_id
    assert loser.tags["promotion.decision"] == "challenger"
    assert loser.tags["promotion.reason"] == "agreement 0.78 does not beat champion version 2 (0.85)"
    assert loser.tags["promotion.compared_with"] == "2"
    assert champion_version(client, "sentiment-student") == "2"
    # The pipeline run says the same, so the runs page shows it without opening the registry.
    run = client.get_run(run_id)
    assert run.data.tags["azdistill.promotion"] == "challenger"
    assert run.data.tags["azdistill.registered_version"] == "3"
    assert run.data.tags["azdistill.promotion.reason"] == loser.tags["promotion.reason"]


def test_a_retrain_that_fails_a_check_is_rejected_however_good_its_metric(registry):
    from retrains import record_retrain

    from azdistill.evaluation.markdown import headline_lines, render_markdown

    client, _, workdir = registry
    # Best agreement so far, but far too slow: max_latency_ratio 0.1 fails it.
    run_id, decision, report = record_retrain(workdir, "4", 0.99, 0.89, max_latency_ratio=0.1)
    assert not report.promote and not decision.promoted
    assert decision.reason == "failed the promotion checks: latency_ratio 0.25 > 0.1"
    rejected = client.get_model_version("sentiment-student", "4")
    assert rejected.tags["promotion.reason"] == decision.reason and rejected.tags["promotion.decision"] == "rejected"
    assert "promotion.compared_with" not in rejected.tags
    assert client.get_run(run_id).data.tags["azdistill.promotion"] == "rejected"
    assert champion_version(client, "sentiment-student") == "2"
    # The report said so before the registry did, in the same words.
    assert headline_lines(report)[-1] == f"promotion: REJECTED: {decision.reason}"
    assert f"## Promotion: REJECTED\n\nF{decision.reason[1:]}." in render_markdown(report)


def test_a_lone_first_version_that_fails_the_checks_is_rejected(tmp_path):
    from mlflow import MlflowClient
    from retrains import record_retrain

    from azdistill.evaluation.markdown import headline_lines

    _, decision, report = record_retrain(tmp_path, "1", 0.4, 0.5)  # agreement 0.4 < min_agreement 0.6
    assert not decision.promoted and decision.decision == "rejected" and decision.champion_version is None
    assert decision.summary() == f"version 1 is rejected, so there is no champion yet: {decision.reason}"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_model_version("sentiment-student", "1").tags["promotion.decision"] == "rejected"
    assert champion_version(client, "sentiment-student") is None
    assert headline_lines(report)[-1] == f"promotion: REJECTED: {decision.reason}"


def test_the_report_words_its_promotion_as_the_registry_decides():
    """What the report says will happen is what `decide` does with the same checks."""
    from azdistill.evaluation.promotion import promotion_verdict
    from azdistill.evaluation.report import Report

    checks = [PromotionCheck("agreement", 0.7123, 0.8, ">=", False), PromotionCheck("latency_ratio", 0.3, 0.5, "<=", True)]
    report = Report("p", "nli", "1", "now", "accuracy", [], False, checks, "cpu", champion_metric="accuracy")
    verdict, what = promotion_verdict(report)
    decision = decide("5", "accuracy", 0.9, failed_check_descriptions(checks), "4", 0.8)
    assert (verdict, what) == ("REJECTED", decision.reason) and decision.decision == "rejected"

    report.checks = checks[1:]
    assert promotion_verdict(report) == ("PROMOTE", "becomes champion unless the current champion's accuracy is as high")
    assert decide("5", "accuracy", 0.8, [], "4", 0.8).decision == "challenger"  # as high: the champion stays
    assert decide("5", "accuracy", 0.8, [], None, None).decision == "champion"  # none yet: it becomes champion


def test_the_configured_metric_decides(registry):
    client, _, _ = registry
    # On accuracy, version 3 (0.88) beats the champion (0.86) where on agreement it lost.
    decision = apply_promotion(client, "sentiment-student", "3", "accuracy", failed_checks=[])
    assert decision.promoted and decision.reason == "accuracy 0.88 beats champion version 2 (0.86)"
    assert champion_version(client, "sentiment-student") == "3"
    # Applying the rule again to the champion changes nothing, nor the reason it won with.
    again = apply_promotion(client, "sentiment-student", "3", "accuracy", failed_checks=[])
    assert again.promoted and again.reason.startswith("already the champion")
    assert client.get_model_version("sentiment-student", "3").tags["promotion.reason"] == decision.reason
    # Without a list of failed checks, the version's `promote` tag (false for version 4) stands for them.
    from_tag = apply_promotion(client, "sentiment-student", "4", "agreement")
    assert not from_tag.promoted and "promotion checks did not pass" in from_tag.reason


def test_no_registered_model_means_no_champion(registry):
    client, _, _ = registry
    assert champion_version(client, "no-such-model") is None
