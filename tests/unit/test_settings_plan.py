"""pipelines.settings: the settings a reused server connection needs for its next client."""

from __future__ import annotations

from pgcorral.pipelines.settings import canonical_names, learn, plan, reported_requests

BASE = {"application_name": "", "DateStyle": "ISO, MDY", "client_encoding": "UTF8",
        "TimeZone": "UTC"}
NAMES = canonical_names(BASE)


def test_nothing_to_do_when_the_connection_already_matches() -> None:
    current = {**BASE, "application_name": "app"}
    assert plan({"application_name": "app"}, current, BASE, NAMES, {}) == []


def test_names_are_matched_without_case() -> None:
    assert plan({"datestyle": "ISO, MDY"}, BASE, BASE, NAMES, {}) == []
    assert plan({"timezone": "Asia/Tokyo"}, BASE, BASE, NAMES, {}) == [("TimeZone", "Asia/Tokyo")]


def test_what_a_previous_client_left_is_put_back_to_the_baseline() -> None:
    current = {**BASE, "application_name": "previous", "TimeZone": "Asia/Tokyo"}
    assert plan({}, current, BASE, NAMES, {}) == [("application_name", ""), ("TimeZone", "UTC")]


def test_a_changed_setting_is_reset_before_the_new_value_is_applied() -> None:
    # DateStyle=dmy keeps the output style of the current value: start from the baseline
    current = {**BASE, "DateStyle": "SQL, DMY"}
    assert plan({"DateStyle": "dmy"}, current, BASE, NAMES, {}) == [
        ("DateStyle", "ISO, MDY"), ("DateStyle", "dmy")]


def test_unreported_settings_are_always_applied() -> None:
    assert plan({"geqo": "off"}, BASE, BASE, NAMES, {}) == [("geqo", "off")]


def test_learned_normalisation_avoids_a_needless_round_trip() -> None:
    learned: dict[tuple[str, str], str] = {}
    applied = [("client_encoding", "utf-8")]
    learn(learned, applied, {**BASE, "client_encoding": "UTF8"})
    assert plan({"client_encoding": "utf-8"}, BASE, BASE, NAMES, learned) == []


def test_reported_requests_use_canonical_names() -> None:
    requested = {"datestyle": "sql", "geqo": "off", "application_name": "x"}
    assert reported_requests(requested, NAMES) == [("DateStyle", "sql"),
                                                   ("application_name", "x")]
