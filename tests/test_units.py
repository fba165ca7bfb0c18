import pytest

from dsacache.errors import DsacacheError
from dsacache.units import format_size, parse_size, parse_spec


@pytest.mark.parametrize(
    "text,expected",
    [
        ("4096", 4096),
        ("50MiB", 50 * 2**20),
        ("16MB", 16_000_000),
        ("1.5KiB", 1536),
        (" 2 gib ", 2 * 2**30),
        (7, 7),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["50XB", "", "MiB", "-5", "1.3B", "5 MiB extra"])
def test_parse_size_rejects_with_value_and_allowed_units(bad):
    with pytest.raises(DsacacheError) as e:
        parse_size(bad)
    assert repr(bad) in str(e.value) or bad.strip() in str(e.value)


def test_parse_size_error_lists_units():
    with pytest.raises(DsacacheError, match="MiB"):
        parse_size("50XB")


def test_format_size():
    assert format_size(52_428_800) == "50 MiB"
    assert format_size(100) == "100 B"


def test_parse_spec():
    s = parse_spec("reserve:bytes=16MiB,inner=token-lru")
    assert s.name == "reserve" and s.params == {"bytes": "16MiB", "inner": "token-lru"}
    assert str(s) == "reserve:bytes=16MiB,inner=token-lru"
    assert parse_spec("lru").params == {}


@pytest.mark.parametrize("bad", ["", ":x=1", "lru:x", "lru:x=1,x=2", "lru:=3", "1abc"])
def test_parse_spec_rejects(bad):
    with pytest.raises(DsacacheError):
        parse_spec(bad)
