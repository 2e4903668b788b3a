import pytest

from supervisor.units import format_size, mib, parse_duration, parse_size

pytestmark = pytest.mark.timeout(60)

GiB = 1024**3
MiB = 1024**2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6GiB", 6 * GiB),
        ("6 GiB", 6 * GiB),
        ("6gib", 6 * GiB),
        ("5000MB", 5_000_000_000),
        ("512M", 512 * MiB),
        ("512m", 512 * MiB),
        ("2K", 2048),
        ("2KiB", 2048),
        ("2KB", 2000),
        ("1T", 1024**4),
        ("1TB", 10**12),
        ("1.5G", int(1.5 * GiB)),
        ("0.5 MiB", MiB // 2),
        ("100", 100),
        ("100B", 100),
        ("  7 G  ", 7 * GiB),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "6 GiBs", "6 XB", "-1", "1.2.3", "6 G B", "lots", -5, True, None])
def test_parse_size_errors_name_value_and_forms(bad):
    with pytest.raises(ValueError) as info:
        parse_size(bad)
    message = str(info.value)
    assert "\n" not in message
    assert repr(bad) in message
    assert "must not be negative" in message or "GiB" in message


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1024, "1.0 KiB"),
        (int(5.6 * GiB), "5.6 GiB"),
        (6 * GiB, "6.0 GiB"),
        (MiB - 1, "1.0 MiB"),
        (300 * MiB, "300.0 MiB"),
        (-2 * GiB, "-2.0 GiB"),
        (3 * 1024**5, "3.0 PiB"),
    ],
)
def test_format_size(n, text):
    assert format_size(n) == text


def test_format_roundtrip_close():
    for n in (1, 1023, 10**6, 7 * GiB + 123, 10**12):
        back = parse_size(format_size(n).replace(" ", ""))
        assert abs(back - n) <= max(1, n * 0.05)


def test_mib():
    assert mib(MiB) == 1.0
    assert mib(3 * GiB) == 3072.0
    assert mib(512 * 1024) == 0.5


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("250ms", 0.25),
        ("1h30m", 5400.0),
        ("1h 30m 5s", 5405.0),
        ("1.5s", 1.5),
        ("2", 2.0),
        ("2d", 172800.0),
        ("500us", 0.0005),
        (1.5, 1.5),
        (3, 3.0),
        (0, 0.0),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "x", "5 parsecs", "-1s", "1h30", "s", -1, float("nan"), float("inf"), True])
def test_parse_duration_errors(bad):
    with pytest.raises(ValueError) as info:
        parse_duration(bad)
    assert "\n" not in str(info.value)
    assert "30s" in str(info.value)
