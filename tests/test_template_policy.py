"""The template housekeeping policy (`ember.core.templates.to_stop`): pure, over plain facts.

Scale to zero means memory near zero: an idle template stops, and all templates together stay
within a memory budget, the least recently used going first and those serving workers last.
"""

from __future__ import annotations

from ember.core.templates import TemplateFacts, to_stop

MIB = 1 << 20


def t(key: str, rss_mib: int, idle_s: float, workers: int = 0) -> TemplateFacts:
    return TemplateFacts(key, rss_mib * MIB, idle_s, workers)


def test_an_idle_template_with_no_workers_stops() -> None:
    facts = [t("busy", 100, 1.0), t("idle", 100, 700.0)]
    assert to_stop(facts, idle_s=600, budget_bytes=10_000 * MIB) == ["idle"]


def test_an_idle_template_whose_forks_still_run_is_kept_under_budget() -> None:
    facts = [t("serving", 100, 900.0, workers=2)]
    assert to_stop(facts, idle_s=600, budget_bytes=10_000 * MIB) == []


def test_over_budget_the_least_recently_used_go_first_until_it_fits() -> None:
    facts = [t("new", 300, 1.0), t("old", 300, 50.0), t("older", 300, 90.0)]
    assert to_stop(facts, idle_s=600, budget_bytes=700 * MIB) == ["older"]
    assert to_stop(facts, idle_s=600, budget_bytes=300 * MIB) == ["older", "old"]


def test_over_budget_a_template_serving_workers_goes_after_those_that_serve_none() -> None:
    facts = [t("serving", 500, 100.0, workers=1), t("quiet", 500, 10.0)]
    assert to_stop(facts, idle_s=600, budget_bytes=600 * MIB) == ["quiet"]
    assert to_stop(facts, idle_s=600, budget_bytes=0) == ["quiet", "serving"]


def test_within_budget_and_recently_used_nothing_stops() -> None:
    assert to_stop([t("a", 100, 5.0), t("b", 100, 6.0)], 600, 1000 * MIB) == []
    assert to_stop([], 600, 0) == []
