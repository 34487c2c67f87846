"""The human docs page (``/docs``): one HTML page rendered from the OpenAPI document.

Swagger UI would load its scripts and styles from a CDN, which a cluster without
Internet access cannot reach; this page needs nothing but itself: no script, no
stylesheet, no image, no link leaving the page. It lists every route with its
method, summary, description, parameters, request body and responses, and every
schema with its fields, naming schemas as the document does.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 62em; padding: 0 1em; }
h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { font-family: monospace; font-size: 1.05em; margin: 1.8em 0 .3em; }
.method { background: #334; color: #fff; padding: .1em .5em; border-radius: 3px; }
table { border-collapse: collapse; margin: .4em 0 1em; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
code, .type { font-family: monospace; }
.note { background: #f4f4f8; padding: .6em 1em; border-left: 3px solid #889; }
p.text { white-space: pre-line; }
"""

_METHODS = ("get", "put", "post", "patch", "delete", "head", "options")


def schema_name(schema: dict[str, Any] | None) -> str:
    """A schema as the document names it: its component name, or its type."""
    if not schema:
        return "any"
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    for combined in ("anyOf", "oneOf", "allOf"):
        if combined in schema:
            return " | ".join(schema_name(s) for s in schema[combined])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {schema_name(schema.get('items'))}"
    if "enum" in schema:
        return " | ".join(repr(v) for v in schema["enum"])
    if "const" in schema:
        return repr(schema["const"])
    return str(kind) + (f" ({schema['format']})" if "format" in schema else "")


def _anchor(name: str) -> str:
    return "schema-" + "".join(c if c.isalnum() else "-" for c in name)


def _type_cell(schema: dict[str, Any] | None, known: set[str]) -> str:
    """The schema's name, linked (inside the page) when it is a component."""
    words = [
        f'<a href="#{_anchor(word)}">{escape(word)}</a>' if word in known else escape(word)
        for word in schema_name(schema).split(" ")
    ]
    return f'<span class="type">{" ".join(words)}</span>'


def _table(head: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    header = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{header}</tr>{body}</table>"


def _operation(path: str, method: str, op: dict[str, Any], known: set[str]) -> str:
    parts = [
        f'<h3 id="{escape(op.get("operationId", path + method))}">'
        f'<span class="method">{method.upper()}</span> {escape(path)}</h3>',
        f"<p><strong>{escape(op.get('summary', ''))}</strong></p>",
    ]
    if op.get("description"):
        parts.append(f'<p class="text">{escape(op["description"])}</p>')
    params = op.get("parameters", [])
    if params:
        param_rows = [
            (
                f"<code>{escape(p['name'])}</code>",
                escape(p.get("in", "")),
                "yes" if p.get("required") else "no",
                _type_cell(p.get("schema"), known),
                escape(p.get("description", "")),
            )
            for p in params
        ]
        parts.append(_table(("Parameter", "In", "Required", "Type", "Description"), param_rows))
    body = op.get("requestBody")
    if body:
        body_rows = [
            (escape(media), _type_cell(content.get("schema"), known))
            for media, content in body.get("content", {}).items()
        ]
        required = "required" if body.get("required") else "optional"
        parts.append(
            f"<p>Request body ({required}):</p>" + _table(("Media type", "Schema"), body_rows)
        )
    rows: list[tuple[str, str, str]] = []
    for code, answer in op.get("responses", {}).items():
        content = answer.get("content", {})
        media = next(iter(content), "")
        schema = _type_cell(content[media].get("schema"), known) if media else "(no body)"
        rows.append((escape(str(code)), escape(answer.get("description", "")), schema))
    parts.append(_table(("Status", "Meaning", "Body"), rows))
    return "\n".join(parts)


def _schema(name: str, schema: dict[str, Any], known: set[str]) -> str:
    parts = [f'<h3 id="{_anchor(name)}">{escape(name)}</h3>']
    if schema.get("description"):
        parts.append(f'<p class="text">{escape(schema["description"])}</p>')
    required = set(schema.get("required", []))
    rows = [
        (
            f"<code>{escape(field)}</code>",
            _type_cell(spec, known),
            "yes" if field in required else "no",
            escape(spec.get("description", "")),
        )
        for field, spec in schema.get("properties", {}).items()
    ]
    if rows:
        parts.append(_table(("Field", "Type", "Required", "Description"), rows))
    else:
        parts.append(f"<p>{_type_cell(schema, known)}</p>")
    return "\n".join(parts)


def render(document: dict[str, Any]) -> str:
    """The page for ``document`` (an OpenAPI 3 document as a dict)."""
    info = document.get("info", {})
    schemas: dict[str, Any] = document.get("components", {}).get("schemas", {})
    known = set(schemas)
    title = escape(f"{info.get('title', 'API')} {info.get('version', '')}".strip())
    operations = [
        _operation(path, method, ops[method], known)
        for path, ops in document.get("paths", {}).items()
        for method in _METHODS
        if method in ops
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{title}</title><style>{_STYLE}</style></head><body>",
            f"<h1>{title}</h1>",
            f'<p class="text">{escape(info.get("description", ""))}</p>',
            '<p class="note">Authentication: every <code>/v1</code> route needs '
            "<code>Authorization: Bearer &lt;API key&gt;</code>; a <code>read</code> key "
            "may call the GET routes, changes need a <code>read-write</code> key. The "
            'machine-readable document is <a href="openapi.json">openapi.json</a>.</p>',
            "<h2>Routes</h2>",
            *operations,
            "<h2>Schemas</h2>",
            *(_schema(name, schemas[name], known) for name in sorted(schemas)),
            "</body></html>",
        ]
    )
