"""Print the README's settings table from the Settings model (the single source)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dispatcher.settings import ENV_PREFIX, Settings


def default_text(name: str) -> str:
    field = Settings.model_fields[name]
    factory = field.default_factory
    value = factory() if factory is not None else field.default  # type: ignore[call-arg]
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value) if value else "(empty)"
    return str(value)


def table() -> str:
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        text = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{ENV_PREFIX}{name.upper()}` | `{default_text(name)}` | {text} |")
    return "\n".join(lines)


def write_readme(path: Path) -> None:
    """Replace the table between the README's settings markers."""
    text = path.read_text()
    start = text.index("\n", text.index("<!-- settings:start")) + 1
    end = text.index("<!-- settings:end -->")
    path.write_text(text[:start] + table() + "\n" + text[end:])


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_readme(Path(__file__).resolve().parent.parent / "README.md")
    else:
        sys.stdout.write(table() + "\n")
