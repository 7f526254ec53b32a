"""Which settings must be applied so that a server connection looks, to a client, like a fresh
connection opened with that client's startup parameters. Pure functions, no I/O.

Terms:

* *reported* settings are those PostgreSQL announces with ParameterStatus (application_name,
  DateStyle, TimeZone, client_encoding, IntervalStyle, ...). pgcorral always knows their current
  value on a server connection (``current``) and their value right after login or RESET ALL
  (``baseline``).
* other settings (``geqo``, ``search_path`` on PostgreSQL 15, ...) are unknown after a client has
  used the connection; ``DISCARD ALL`` resets them, so they are applied for every client that
  asks for them.

A plan is a list of ``(name, value)`` pairs, applied in order by one ``set_config`` statement.
A reported setting that differs from its baseline is first put back to the baseline, then set
to the requested value: PostgreSQL reads some values relative to the current one (``DateStyle =
dmy`` keeps the output style), and the client must get what a fresh connection would give.

``learned`` maps ``(name, requested value)`` to the value PostgreSQL reported after applying it
from the baseline (``utf-8`` -> ``UTF8``, ``sql,dmy`` -> ``SQL, DMY``), so that a connection that
already shows the normalised value is not set again.
"""

from __future__ import annotations

from collections.abc import Mapping

Pairs = list[tuple[str, str]]

#: Bound of the ``learned`` map; it is cleared when it grows past this.
LEARNED_LIMIT = 4096


def canonical_names(baseline: Mapping[str, str]) -> dict[str, str]:
    """Lower-case name -> the spelling PostgreSQL reports (GUC names ignore case)."""
    return {name.lower(): name for name in baseline}


def plan(requested: Mapping[str, str], current: Mapping[str, str], baseline: Mapping[str, str],
         names: Mapping[str, str], learned: Mapping[tuple[str, str], str]) -> Pairs:
    """The pairs to apply for a client asking for ``requested`` on a connection in ``current``."""
    pairs: Pairs = []
    touched: set[str] = set()
    for name, value in requested.items():
        canon = names.get(name.lower())
        if canon is None:  # not reported: its value is unknown, so always apply it
            pairs.append((name, value))
            continue
        touched.add(canon)
        now = current.get(canon)
        if now == value or now == learned.get((canon, value)):
            continue
        if now != baseline.get(canon):
            pairs.append((canon, baseline[canon]))
        pairs.append((canon, value))
    for canon, now in current.items():  # what an earlier client left that this one did not ask
        if canon not in touched and canon in baseline and now != baseline[canon]:
            pairs.append((canon, baseline[canon]))
    return pairs


def reported_requests(requested: Mapping[str, str], names: Mapping[str, str]) -> Pairs:
    """The client's requests for reported settings, under their canonical names."""
    out: Pairs = []
    for name, value in requested.items():
        canon = names.get(name.lower())
        if canon is not None:
            out.append((canon, value))
    return out


def learn(learned: dict[tuple[str, str], str], applied: Pairs,
          current: Mapping[str, str]) -> None:
    """Remember what PostgreSQL made of each requested value (the last pair per name wins)."""
    if len(learned) > LEARNED_LIMIT:
        learned.clear()
    final = dict(applied)
    for name, value in final.items():
        if name in current:
            learned[(name, value)] = current[name]
