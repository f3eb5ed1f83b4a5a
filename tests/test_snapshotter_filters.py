"""containerd's filter syntax as the snapshotter parses it (List's filters)."""

from __future__ import annotations

import pytest

from thinpool.snapshotter.errors import InvalidArgument
from thinpool.snapshotter.filters import parse_all, unquote

SNAP = {"name": "a-wl", "parent": "p-wl", "kind": "active",
        "labels": {"l": "2", "containerd.io/gc.root": "check-walk", "a.b": "dotted"}}


def fields(path: list[str]) -> tuple[str, bool]:
    if path[0] == "labels":
        labels = SNAP["labels"]
        assert isinstance(labels, dict)
        key = ".".join(path[1:])
        return labels.get(key, ""), key in labels
    value = SNAP.get(path[0])
    return (value, True) if isinstance(value, str) else ("", False)


@pytest.mark.parametrize("filters,expected", [
    ([], True),
    ([""], True),
    (['labels."containerd.io/gc.root"==check-walk'], True),
    (['kind==active,labels."containerd.io/gc.root"==check-walk'], True),
    (["kind==view"], False),
    (["kind==view", "name==a-wl"], True),  # any of several
    (["name==a-wl,labels.l"], True),  # presence
    (["labels.missing"], False),
    (['parent!=""'], True),
    (["parent!=p-wl"], False),
    (["labels.l==2"], True),
    (["labels.a.b==dotted"], True),  # the rest of the path joined with dots
    (['labels."a.b"==dotted'], True),
    (["name~=/^a-/"], True),
    (["name~=|w.$|"], True),
    (['name~="^p"'], False),
    ([" name == a-wl,  kind ==active"], True),  # white space before a token (not after a value)
    (['name=="a\\x2dwl"'], True),  # Go escapes in quoted values
    (["nosuchfield!=x"], True),  # absent compares as ""
])
def test_matches_like_containerd(filters: list[str], expected: bool) -> None:
    assert parse_all(filters).match(fields) is expected


@pytest.mark.parametrize("text,message", [
    ("name==", "unexpected EOF"),
    ("name=x", "unsupported operator"),
    ("name===x", "unsupported operator"),
    (",", "expected field or quoted"),
    ("name==a,", "expected field or quoted"),
    ('labels."x', "quoted literal not terminated"),
    ("na me", "expected an operator"),
    ('"\\q"==1', "illegal escape sequence"),
    ("name==/x/", "invalid quote encountered"),  # /.../ only after ~=
    ("name~=/[/", "invalid regular expression"),
    ("name==a b", "unexpected input"),
    ("name==a ,kind==view", "unexpected input"),
    ("labels.==x", "expected field or quoted"),
    ("name\0==x", "unexpected null"),
])
def test_malformed_filters_are_invalid_arguments(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match="filters") as e:
        parse_all([text])
    assert message in str(e.value)


def test_unquote_follows_go_string_syntax() -> None:
    assert unquote('"a\\tb\\u00e9\\101"') == "a\tbéA"
    assert unquote("/a\\/b/") == "a/b"
    assert unquote("|x\\|y|") == "x|y"
    for bad in ('"', '"a', '"a\\"', '"\\x4"', '"\\777"', '"a"b"'):
        with pytest.raises(ValueError):
            unquote(bad)
