"""Method settings: every value is checked against its type and range when a config is built, and text is parsed
as numbers only."""

import dataclasses

import pytest

from faceshield.methods.base import get_method_class, list_methods, method_config
from faceshield.settings import Interval, SettingError, parse_number, parse_overrides


@pytest.mark.parametrize("text, value", [("0.03", 0.03), ("8/255", 8 / 255), ("-4/255", -4 / 255),
                                         ("2*4/255", 8 / 255), ("(1+1)/4", 0.5), (" 1e-3 ", 1e-3)])
def test_parse_number_accepts_arithmetic_of_numbers(text, value):
    assert parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["1/0", "nan", "inf", "1e999", "2**10", "__import__('os')", "x", "", "[1]",
                                  "True", "1 if 1 else 2", "9" * 200])
def test_parse_number_refuses_everything_else(text):
    with pytest.raises(ValueError):
        parse_number(text)


def test_interval_ends():
    half_open = Interval.parse("(0, 1]")
    assert 0 not in half_open and 1e-9 in half_open and 1 in half_open and 1.0001 not in half_open
    assert 10**9 in Interval.parse("[1, inf)") and 0.5 not in Interval.parse("[1, inf)")


def test_every_method_default_is_inside_its_declared_range():
    for name in list_methods():
        cls = get_method_class(name)
        cls.Config()  # __post_init__ checks every default
        assert any(f.metadata.get("interval") for f in dataclasses.fields(cls.Config)), name


@pytest.mark.parametrize("method, overrides, message", [
    ("cloak", {"steps": 0}, "cloak: steps=0 is out of range; allowed: [1, inf)"),
    ("cloak", {"epsilon": 0.0}, "allowed: (0, 1]"),
    ("cloak", {"steps": "10"}, "steps='10' must be a whole number"),
    ("cloak", {"steps": True}, "must be a whole number"),
    ("cloak", {"eot": 1}, "eot=1 must be true or false"),
    ("cloak", {"epsilon": float("nan")}, "must be a finite number"),
    ("cloak", {"surrogates": "dlib-resnet"}, "must be a comma-separated list of names"),
    ("pgd", {"step_size": 0.0}, "pgd: step_size=0.0 is out of range"),
    ("tip-im", {"diversity_probability": 1.5}, "tip-im: diversity_probability=1.5 is out of range"),
    ("adv-latent", {"dtype": "int8"}, "dtype='int8' is not allowed; choose one of: auto"),
    ("adv-latent", {"adv_weight": 0.0}, "adv_weight=0.0 is out of range"),
])
def test_bad_values_are_refused_with_one_line(method, overrides, message):
    with pytest.raises(SettingError) as error:
        method_config(method, **overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_ints_given_for_floats_become_floats_and_presets_apply():
    config = method_config("cloak", preset="high", epsilon=1)
    assert config.epsilon == 1.0 and isinstance(config.epsilon, float) and config.steps == 60


def test_parse_overrides_types_each_key_by_its_config():
    cloak = get_method_class("cloak").Config
    parsed = parse_overrides(cloak, ["epsilon=4/255", "steps=60", "eot=no", "surrogates=a, b", "device=cpu"])
    assert parsed == {"epsilon": pytest.approx(4 / 255), "steps": 60, "eot": False, "surrogates": ("a", "b"),
                      "device": "cpu"}
    assert parse_overrides(cloak, ["steps=2*30"]) == {"steps": 60}
    with pytest.raises(SettingError, match="steps needs a whole number"):
        parse_overrides(cloak, ["steps=1.5"])
