"""Champion and challenger: which registered student is the one in service.

Every retrain registers its student as a new version of the config's registered model. The version the
`champion` alias points at is the model in service. A new version (the challenger) takes the alias only when

1. it passed the evaluation's promotion checks (agreement, quality kept, latency, beats the baseline), and
2. it beats the current champion on `evaluation.promotion.champion_metric` (higher is better; a tie keeps the
   champion, so a retrain that changed nothing does not churn the alias).

The first version that passes the checks becomes champion. A version that fails the checks is `rejected`, with the
checks it failed as its reason, whether or not there is a champion; one that passed them but does not beat the
champion stays a `challenger`. Either way it stays registered with tags saying why (`promotion.reason`), so the
registry tells the whole story: what was tried and what won. The evaluation report words its promotion line the same
way (`evaluation/promotion.py` holds the shared words).

`decide` is the rule alone, on plain values; `apply_promotion` reads the registry, decides and writes the
alias and tags. The metric values are the `metric.<name>` tags every version gets when it is registered.

On Azure ML the same rule runs in the register step (`azure/injob.py register_student`), but the workspace's
MLflow has no registered-model aliases, so there the champion is the version tagged `azdistill.champion=true`.
`champion_among` and `champion_version` read both: the alias where the store has one, else the tag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from azdistill.evaluation.promotion import CHALLENGER, CHAMPION, REJECTED, check_figure, rejection_reason

CHAMPION_ALIAS = CHAMPION  # the alias is named after the decision it records
# The champion on Azure ML, whose MLflow has no aliases: "true" on the champion version, "false" on the others the
# register step has judged (azure/injob.py writes it; keep the two names alike).
CHAMPION_TAG = "azdistill.champion"
# Model version tags written by `apply_promotion`.
DECISION_TAG = "promotion.decision"  # "champion", "challenger" or "rejected"
REASON_TAG = "promotion.reason"
METRIC_TAG = "promotion.metric"
COMPARED_WITH_TAG = "promotion.compared_with"  # the champion version it was measured against, if any
REPLACED_BY_TAG = "promotion.replaced_by"  # on a former champion: the version that took the alias
# Pipeline run tags, so the MLflow UI and `azdistill runs list` show the outcome beside the run.
RUN_VERSION_TAG = "azdistill.registered_version"
RUN_DECISION_TAG = "azdistill.promotion"
RUN_REASON_TAG = "azdistill.promotion.reason"


@dataclass(frozen=True)
class PromotionDecision:
    """The outcome of the champion/challenger rule for one registered version."""

    version: str
    promoted: bool  # the version is the champion after the decision
    reason: str
    metric: str
    value: Optional[float]  # the version's value of `metric`
    champion_version: Optional[str]  # the champion before the decision (None: there was none)
    champion_value: Optional[float]
    rejected: bool = False  # it failed the promotion checks: never compared with a champion

    @property
    def decision(self) -> str:
        """The version's `promotion.decision` tag: "champion", "rejected" (failed the checks) or "challenger"."""
        if self.promoted:
            return CHAMPION_ALIAS
        return REJECTED if self.rejected else CHALLENGER

    def summary(self) -> str:
        """One line for the console: what the version is now, and why."""
        if self.promoted:
            return f"version {self.version} is the {CHAMPION_ALIAS}: {self.reason}"
        if self.rejected:
            if self.champion_version is None:
                return f"version {self.version} is {REJECTED}, so there is no {CHAMPION_ALIAS} yet: {self.reason}"
            champion = f"{CHAMPION_ALIAS}: version {self.champion_version} stays"
            return f"version {self.version} is {REJECTED} ({champion}): {self.reason}"
        if self.champion_version is None:
            return f"version {self.version} stays a {CHALLENGER} (there is no {CHAMPION_ALIAS} yet): {self.reason}"
        return f"version {self.version} stays a {CHALLENGER} ({CHAMPION_ALIAS}: version {self.champion_version}): {self.reason}"

    def version_tags(self) -> dict[str, str]:
        tags = {DECISION_TAG: self.decision, REASON_TAG: self.reason, METRIC_TAG: self.metric}
        if not self.rejected and self.champion_version is not None and self.champion_version != self.version:
            tags[COMPARED_WITH_TAG] = self.champion_version  # a rejected version was never compared with it
        return tags

    def run_tags(self) -> dict[str, str]:
        return {RUN_VERSION_TAG: self.version, RUN_DECISION_TAG: self.decision, RUN_REASON_TAG: self.reason}


def decide(
    version: str,
    metric: str,
    value: Optional[float],
    failed_checks: list[str],
    champion_version: Optional[str],
    champion_value: Optional[float],
) -> PromotionDecision:
    """The champion/challenger rule (see the module docstring) on plain values; writes nothing."""

    def outcome(promoted: bool, reason: str, rejected: bool = False) -> PromotionDecision:
        return PromotionDecision(version, promoted, reason, metric, value, champion_version, champion_value, rejected)

    if champion_version == version:
        return outcome(True, f"already the champion ({metric} {_show(value)})")
    if failed_checks:
        return outcome(False, rejection_reason(failed_checks), rejected=True)
    if value is None:
        return outcome(False, f"no {metric} was measured for this version, so it cannot be compared with a champion")
    if champion_version is None:
        return outcome(True, f"first version to pass the promotion checks ({metric} {_show(value)})")
    if champion_value is None:
        return outcome(
            False,
            f"champion version {champion_version} has no recorded {metric} to compare with; move the "
            f"'{CHAMPION_ALIAS}' alias by hand in the MLflow UI if this version should serve",
        )
    if value > champion_value:
        return outcome(True, f"{metric} {_show(value)} beats champion version {champion_version} ({_show(champion_value)})")
    return outcome(
        False, f"{metric} {_show(value)} does not beat champion version {champion_version} ({_show(champion_value)})"
    )


def _show(value: Optional[float]) -> str:
    return "n/a" if value is None else check_figure(value)


def metric_from_tags(tags: dict[str, str], metric: str) -> Optional[float]:
    """A version's `metric.<name>` tag as a number; None when absent or not a finite number."""
    raw = tags.get(f"metric.{metric}")
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def champion_among(versions: Iterable[Any], aliases: Optional[dict] = None) -> Optional[str]:
    """The champion among a model's `versions` (MLflow ModelVersions): the version the `champion` alias points at
    when `aliases` has it, else the newest version tagged azdistill.champion=true (a workspace's registry), else None."""
    if aliases and aliases.get(CHAMPION_ALIAS) is not None:
        return str(aliases[CHAMPION_ALIAS])
    tagged = [int(version.version) for version in versions if (version.tags or {}).get(CHAMPION_TAG, "").lower() == "true"]
    return str(max(tagged)) if tagged else None


def champion_version(client: Any, model_name: str) -> Optional[str]:
    """The champion version of `model_name` (see `champion_among`), or None (none yet, or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(model_name).aliases or {}
    except MlflowException as error:
        if getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if aliases.get(CHAMPION_ALIAS) is not None:
        return str(aliases[CHAMPION_ALIAS])
    return champion_among(client.search_model_versions(f"name='{model_name}'"))


def apply_promotion(
    client: Any, model_name: str, version: str, metric: str, failed_checks: Optional[list[str]] = None
) -> PromotionDecision:
    """Decide whether `version` of `model_name` becomes champion, and record it in the registry.

    `failed_checks` are the evaluation's failed promotion checks (`failed_check_descriptions`); None reads the
    version's `promote` tag instead. On promotion the `champion` alias moves to `version` and the former
    champion is tagged with its successor; either way `version` gets the decision and its reason as tags.
    Applying it again to the same version changes nothing.
    """
    version = str(version)
    challenger = client.get_model_version(model_name, version)
    if failed_checks is None:
        passed = challenger.tags.get("promote", "").lower() == "true"
        failed_checks = [] if passed else ["the evaluation's promotion checks did not pass (see the run's report.md)"]
    current = champion_version(client, model_name)
    current_value = None
    if current is not None and current != version:
        current_value = metric_from_tags(client.get_model_version(model_name, current).tags, metric)
    decision = decide(version, metric, metric_from_tags(challenger.tags, metric), failed_checks, current, current_value)
    if decision.promoted and current != version:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
        if current is not None:
            client.set_model_version_tag(model_name, current, REPLACED_BY_TAG, version)
    if current != version:  # re-applying to the champion keeps the reason it won with
        for key, value in decision.version_tags().items():
            client.set_model_version_tag(model_name, version, key, value)
    return decision
