"""Parses the databases ("limits") file and picks the limit rule for a database and user.

Owns the syntax ``DATABASE[=alias1,alias2,...] USER MAX_SIZE [INITIAL_SIZE [MIN_SIZE]]`` with
``#`` comments, the resolution of ``all`` sizes against ``max_connections``, the alias checks, and
``best_limit_rule`` (pgagroal's lookup order). Problems are collected as ``path:line: field: what``
and nothing is raised for bad input. It does not know about pools or connections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pgcorral.config.model import LimitRule
from pgcorral.config.parse import problem

ALL = "all"


@dataclass(slots=True)
class _Raw:
    line: int
    database: str
    aliases: tuple[str, ...]
    user: str
    sizes: list[int | None]  # max, initial, min; None means 'all'


def _size(text: str) -> int | None:
    if text.lower() == ALL:
        return None
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{text!r} is not a non-negative integer or 'all'")
    return int(text)


def _parse_line(path: str, number: int, fields: list[str], problems: list[str]) -> _Raw | None:
    if not 3 <= len(fields) <= 5:
        problems.append(problem(path, number, "fields",
                                "expected DATABASE[=ALIASES] USER MAX_SIZE [INITIAL_SIZE "
                                f"[MIN_SIZE]], got {len(fields)} fields"))
        return None
    database, sep, alias_text = fields[0].partition("=")
    ok = True
    aliases: tuple[str, ...] = ()
    if not database:
        problems.append(problem(path, number, "database", "empty database name"))
        ok = False
    if sep:
        aliases = tuple(alias_text.split(","))
        if database == ALL:
            problems.append(problem(path, number, "aliases", "the 'all' entry cannot have aliases"))
            ok = False
        for alias in aliases:
            if not alias or alias == ALL:
                problems.append(problem(path, number, "aliases", f"invalid alias {alias!r}"))
                ok = False
        if len(set(aliases)) != len(aliases):
            problems.append(problem(path, number, "aliases", "an alias is listed twice"))
            ok = False
    sizes: list[int | None] = []
    for name, text in zip(("max_size", "initial_size", "min_size"), fields[2:], strict=False):
        try:
            sizes.append(_size(text))
        except ValueError as exc:
            problems.append(problem(path, number, name, str(exc)))
            ok = False
    if not ok:
        return None
    sizes += [0] * (3 - len(sizes))
    return _Raw(number, database, aliases, fields[1], sizes)


def _check_aliases(path: str, raws: list[_Raw], problems: list[str]) -> None:
    real = {raw.database for raw in raws}
    owner: dict[str, str] = {}
    for raw in raws:
        for alias in raw.aliases:
            if alias in real:
                problems.append(problem(path, raw.line, "aliases",
                                        f"alias {alias!r} is also a database name in this file"))
            elif owner.setdefault(alias, raw.database) != raw.database:
                problems.append(problem(path, raw.line, "aliases",
                                        f"alias {alias!r} already names database "
                                        f"{owner[alias]!r}"))


def _resolve(path: str, raw: _Raw, remainder: int, warnings: list[str]) -> LimitRule:
    max_size = remainder if raw.sizes[0] is None else raw.sizes[0]
    initial, minimum = (max_size if s is None else s for s in raw.sizes[1:])
    if initial > max_size:
        warnings.append(problem(path, raw.line, "initial_size",
                                f"{initial} is above max_size {max_size}, using {max_size}"))
        initial = max_size
    if minimum > max_size:
        warnings.append(problem(path, raw.line, "min_size",
                                f"{minimum} is above max_size {max_size}, using {max_size}"))
        minimum = max_size
    if initial < minimum:
        warnings.append(problem(path, raw.line, "initial_size",
                                f"{initial} is below min_size {minimum}, using {minimum}"))
        initial = minimum
    return LimitRule(line=raw.line, database=raw.database, aliases=raw.aliases, user=raw.user,
                     max_size=max_size, initial_size=initial, min_size=minimum)


def parse_limits(path: str, text: str, max_connections: int, problems: list[str],
                 warnings: list[str]) -> list[LimitRule]:
    """Parse the text of a databases file; problems and warnings are appended."""
    raws: list[_Raw] = []
    seen: dict[tuple[str, str], int] = {}
    for number, raw_line in enumerate(text.splitlines(), start=1):
        fields = raw_line.split("#", 1)[0].split()
        if not fields:
            continue
        raw = _parse_line(path, number, fields, problems)
        if raw is None:
            continue
        first = seen.setdefault((raw.database, raw.user), number)
        if first != number:
            warnings.append(problem(path, number, "database",
                                    f"{raw.database}/{raw.user} already has a rule at line "
                                    f"{first}; that one is used"))
        raws.append(raw)
    _check_aliases(path, raws, problems)
    explicit = sum(raw.sizes[0] for raw in raws if raw.sizes[0] is not None)
    if explicit > max_connections:
        problems.append(problem(path, None, "max_size",
                                f"the sum of max_size ({explicit}) exceeds max_connections "
                                f"({max_connections})"))
    remainder = max(max_connections - explicit, 0)
    return [_resolve(path, raw, remainder, warnings) for raw in raws]


def best_limit_rule(rules: Sequence[LimitRule], database: str, user: str) -> LimitRule | None:
    """The rule for ``database`` (a real name or an alias) and ``user``, in pgagroal's order.

    Exact database and user first (an alias counts as an exact database, whichever rule declares
    it), then the user with database ``all``, then the database with user ``all``, then
    ``all``/``all``.
    """

    real = next((rule.database for rule in rules if database in rule.aliases), database)

    def db_matches(rule: LimitRule) -> bool:
        return rule.database in (database, real)

    tiers: tuple[tuple[bool, bool], ...] = ((True, True), (False, True), (True, False),
                                            (False, False))
    for exact_db, exact_user in tiers:
        for rule in rules:
            db_ok = db_matches(rule) if exact_db else rule.database == ALL
            user_ok = rule.user == user if exact_user else rule.user == ALL
            if db_ok and user_ok:
                return rule
    return None
