"""``--help`` speaks to a person: every flag says what it does, its default and its variable,
from one source (each ``Settings`` field's ``metadata``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

import pytest

from gateway.config import Settings, setting_help
from tests.processes import run_cli

# Wide enough that argparse wraps nothing (it breaks lines at hyphens: --jwt-/public-key-file).
WIDE = {"COLUMNS": "1000"}


def option_help(text: str) -> dict[str, str]:
    """Each option of an argparse ``--help`` and its help text, wrapped lines joined."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.split("options:", 1)[1].splitlines():
        match = re.match(r"  (?:-\w, )?(--[\w-]+)(?: \[?[A-Z_]+\]?)?(?:\s{2,}(\S.*))?$", line)
        if match:
            current = match[1]
            blocks[current] = match[2] or ""
        elif current is not None and line.startswith(" " * 4):
            blocks[current] += " " + line.strip()
    return {option: " ".join(words.split()) for option, words in blocks.items()}


def flags() -> dict[str, str]:
    """Flag -> setting name, for every operator-facing setting."""
    return {"--" + item.name.replace("_", "-"): item.name
            for item in fields(Settings) if item.name != "dev_mode"}


def expected_default(name: str) -> str | None:
    """The default as shown, read from a real ``Settings()`` where it is a plain value."""
    value = getattr(Settings(), name)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (int, str)) and name != "node_id":
        return str(value)
    return None  # None, (), a computed value: said in words (below)


def test_every_serve_flag_says_what_it_means_its_default_and_its_variable():
    result = run_cli("serve", "--help", env=WIDE)
    assert result.returncode == 0, result.stderr
    blocks = option_help(result.stdout)
    assert set(blocks) == {*flags(), "--help", "--dev"}
    for flag, name in flags().items():
        text = blocks[flag]
        meaning, _, rest = text.partition(" [default: ")
        assert len(meaning.split()) >= 3, (flag, text)
        assert rest.endswith(f"; env GATEWAY_{name.upper()}]"), (flag, text)
        shown = rest.removesuffix(f"; env GATEWAY_{name.upper()}]")
        assert shown and shown not in ("None", "()"), (flag, text)
        if expected_default(name) is not None:
            assert shown == expected_default(name), (flag, text)
    assert "default: off; env GATEWAY_DEV=1" in blocks["--dev"]


@pytest.mark.parametrize(("flag", "default"), [
    ("--port", "default: 8080;"),
    ("--host", "default: 127.0.0.1;"),
    ("--redis-url", "default: unset (embedded in-process backend);"),
    ("--node-id", "default: <hostname>-<random>;"),
    ("--allowed-origins", "default: none: no browser page may connect"),
    ("--log-format", "default: auto;"),
    ("--demo", "default: off;"),
    ("--history-max-age", "default: 86400;"),
])
def test_defaults_read_as_a_person_says_them(flag, default):
    blocks = option_help(run_cli("serve", "--help", env=WIDE).stdout)
    assert default in blocks[flag], blocks[flag]


def test_every_setting_has_a_meaning_and_one_without_is_refused():
    for item in fields(Settings):
        assert str(item.metadata.get("help", "")).strip(), f"Settings.{item.name} has no help"
        assert setting_help(item).endswith(f"; env GATEWAY_{item.name.upper()}]")

    @dataclass
    class Added:
        said: int = field(default=1, metadata={"help": "a setting that says what it does"})
        unsaid: int = 2
        unshown: str | None = field(default=None, metadata={"help": "its default is None"})

    said, unsaid, unshown = fields(Added)
    assert setting_help(said) == "a setting that says what it does [default: 1; env GATEWAY_SAID]"
    with pytest.raises(ValueError, match="unsaid has no metadata 'help'"):
        setting_help(unsaid)
    with pytest.raises(ValueError, match="unshown needs metadata 'default'"):
        setting_help(unshown)


@pytest.mark.parametrize("command", ["token", "tail"])
def test_token_and_tail_flags_each_say_what_they_mean(command):
    result = run_cli(command, "--help", env=WIDE)
    assert result.returncode == 0, result.stderr
    blocks = option_help(result.stdout)
    assert len(blocks) >= 6, result.stdout
    for option, text in blocks.items():
        meaning = re.sub(r"\[(?:default:|env) [^]]*\]", "", text).strip()
        assert len(meaning.split()) >= 2, (option, text)
