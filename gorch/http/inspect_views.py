"""The inspector's pages: Jinja2 templates with autoescaping, and what they show.

Every value from a store, a workflow or a request reaches the page through a
template variable, so Jinja2 escapes it (``<script>`` in an id, a field or an
event's input is shown as text). The only markup passed through unescaped is
the diagram, itself built from escaped parts (:mod:`gorch.http.inspect_diagram`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jinja2
from markupsafe import Markup

from gorch import clock
from gorch.engine import InstanceStatus, Snapshot, Summary
from gorch.history import History
from gorch.http.inspect_style import CSS

MAX_JSON = 200_000
"""Characters of pretty-printed data shown on a page; past that, the JSON API has it all."""
MAX_CELL = 400
"""Characters of an event's input or output shown in a history row."""

_BASE = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>{{ title }} · gorch inspector</title>
<style>{{ css }}</style>
</head>
<body>
<header class="top">
  <a class="brand" href="{{ base }}/inspect">gorch <span>inspector</span></a>
  <span class="spacer"></span>
  {% if logout %}
  <form method="post" action="{{ base }}/inspect/logout">
    <button type="submit">Log out</button>
  </form>
  {% endif %}
</header>
<main>
{% block main %}{% endblock %}
</main>
</body>
</html>
"""

_LIST = """\
{% extends "base" %}
{% block main %}
<h1>Instances</h1>
<div class="card">
<form class="filters" method="get" action="{{ base }}/inspect">
  <label>Workflow
    <select name="workflow" id="f-workflow">
      <option value="">all</option>
      {% for name in workflows %}
      <option value="{{ name }}"{% if name == workflow %} selected{% endif %}>{{ name }}</option>
      {% endfor %}
    </select>
  </label>
  <label>Status
    <select name="status" id="f-status">
      <option value="">all</option>
      {% for s in statuses %}
      <option value="{{ s }}"{% if s == status %} selected{% endif %}>{{ s }}</option>
      {% endfor %}
    </select>
  </label>
  <label>Id contains
    <input type="search" name="q" id="f-q" value="{{ q }}" maxlength="200" placeholder="order-42">
  </label>
  <label>Per page
    <select name="limit" id="f-limit">
      {% for n in limits %}
      <option value="{{ n }}"{% if n == limit %} selected{% endif %}>{{ n }}</option>
      {% endfor %}
    </select>
  </label>
  <button class="primary" type="submit">Filter</button>
  <a href="{{ base }}/inspect">Reset</a>
</form>
</div>
<div class="card">
<table class="instances">
  <thead><tr>
    <th>Id</th><th>Workflow</th><th>Status</th><th>Version</th><th>Next wake-up</th>
  </tr></thead>
  <tbody>
  {% for row in rows %}
    <tr class="instance" data-id="{{ row.item.id }}">
      <td class="id"><a class="instance-link" href="{{ row.href }}">{{ row.item.id }}</a></td>
      <td>{{ row.item.workflow }}</td>
      <td><span class="badge s-{{ row.item.status }}">{{ row.item.status }}</span></td>
      <td>{{ row.item.version }}</td>
      <td>{% if row.item.wake_at %}{{ when(row.item.wake_at) }}
        <span class="muted">({{ relative(row.item.wake_at) }})</span>{% else %}
        <span class="muted">—</span>{% endif %}</td>
    </tr>
  {% else %}
    <tr><td class="empty" colspan="5">No instance matches these filters.</td></tr>
  {% endfor %}
  </tbody>
</table>
{% if scanned %}<p class="count">Searched {{ scanned }} instances for ids containing
  “{{ q }}”{% if next_href %}; more may match further on{% endif %}.</p>{% endif %}
<nav class="pager">
  {% if first_href %}<a id="first-page" href="{{ first_href }}">« First page</a>{% endif %}
  {% if next_href %}<a id="next-page" rel="next" href="{{ next_href }}">Next page »</a>{% endif %}
</nav>
</div>
{% endblock %}
"""

_INSTANCE = """\
{% extends "base" %}
{% block main %}
<p class="crumbs"><a href="{{ list_href }}">← Instances</a></p>
<h1><span class="id">{{ id }}</span>
  {% if status %}<span class="badge s-{{ status }}" id="status">{{ status }}</span>{% endif %}</h1>
<div class="card">
  <dl class="facts">
    <dt>Workflow</dt><dd>{{ workflow }}</dd>
    {% if snap %}
    <dt>Version</dt><dd>{{ snap.version }}</dd>
    <dt>Next wake-up</dt><dd id="next-wakeup">{% if snap.next_wakeup %}{{ when(snap.next_wakeup) }}
      <span class="muted">({{ relative(snap.next_wakeup) }})</span>{% else %}
      <span class="muted">none scheduled</span>{% endif %}</dd>
    <dt>Cursors</dt><dd>{% for t in snap.threads if t.cur_step %}<code>{{ t.cur_step }}</code>
      <span class="muted">({{ t.id }})</span>{% if not loop.last %}, {% endif %}{% else %}
      <span class="muted">none</span>{% endfor %}</dd>
    {% if snap.error %}
    <dt>Error</dt><dd><span class="problem">{{ snap.error }}</span></dd>
    {% endif %}
    {% endif %}
  </dl>
</div>
{% for p in problems %}<p class="problem">{{ p }}</p>{% endfor %}
<div class="card">
  <h2>Diagram</h2>
  {% if diagram %}
  <div class="legend"><span><i class="cursor"></i>a thread is here</span>
    <span><i class="done"></i>DAG node done</span><span><i class="failed"></i>failed</span></div>
  <div class="diagram-wrap" id="diagram">{{ diagram }}</div>
  {% else %}<p class="muted">No diagram: {{ diagram_problem }}</p>{% endif %}
</div>
<div class="grid">
  <div class="stack">
    <div class="card">
      <h2>Awaited events</h2>
      {% if snap and snap.awaited %}
      <table id="awaited">
        <thead><tr><th>Event</th><th>Thread</th><th>pc</th><th>Due</th><th>Input</th></tr></thead>
        <tbody>
        {% for ev in snap.awaited %}
          <tr class="awaited" data-event="{{ ev.name }}">
            <td><code>{{ ev.name }}</code>{% if ev.status == "setup_error" %}
              <span class="problem">setup failed: retried on the next resume</span>
              {% elif ev.status == "pending_setup" %}
              <span class="muted">(not set up yet)</span>{% endif %}</td>
            <td>{{ ev.thread_id }}</td>
            <td>{{ ev.pc }}</td>
            <td>{% if ev.due %}{{ when(ev.due) }}<br>
              <span class="muted">{{ relative(ev.due) }}</span>
              {% else %}<span class="muted">—</span>{% endif %}</td>
            <td>{% if ev.input_schema is none %}<span class="muted">no input</span>
              {% elif not ev.input_schema %}<span class="muted">any JSON</span>
              {% else %}
              {% set fs = fields(ev.input_schema) %}
              {% if fs %}<ul class="fields">{% for f in fs %}
                <li><code>{{ f.name }}</code>
                  {%- if f.required %}<span class="req">*</span>{% endif %}:
                  {{ f.type }}</li>{% endfor %}</ul>{% endif %}
              <details><summary>JSON schema</summary>
                <pre class="json">{{ pretty(ev.input_schema) }}</pre></details>
              {% endif %}</td>
          </tr>
        {% endfor %}
        </tbody>
      </table>
      {% else %}<p class="muted">Nothing awaited.</p>{% endif %}
    </div>
    <div class="card">
      <h2>Threads</h2>
      {% if snap and snap.threads %}
      <table id="threads">
        <thead><tr><th>Thread</th><th>Cursor</th><th>Status</th><th>Attempts</th></tr></thead>
        <tbody>
        {% for t in snap.threads %}
          <tr><td>{{ t.id }}</td><td><code>{{ t.cur_step or "—" }}</code></td>
            <td>{{ t.status }}{% if t.error %}<br>
              <span class="problem">{{ t.error }}</span>{% endif %}</td>
            <td>{{ t.attempts }}</td></tr>
        {% endfor %}
        </tbody>
      </table>
      {% else %}<p class="muted">No threads.</p>{% endif %}
    </div>
  </div>
  <div class="card">
    <h2>Data</h2>
    {% if snap %}<pre class="json" id="data">{{ pretty(snap.data) }}</pre>
    {% else %}<p class="muted">Not readable.</p>{% endif %}
  </div>
</div>
<div class="card">
  <h2>History</h2>
  {% if history is none %}<p class="muted">Not available: {{ history_problem }}</p>
  {% else %}
  {% if history.dropped %}<p class="muted">{{ history.dropped }} older entries are no longer
    kept.</p>{% endif %}
  <table id="history">
    <thead><tr><th>When (UTC)</th><th>What</th><th>Name</th><th>Thread</th><th>pc</th>
      <th>Attempt</th><th>Took</th><th>By</th><th>Input</th><th>Output</th><th>Error</th></tr></thead>
    <tbody>
    {% for e in history %}
      <tr class="entry">
        <td class="mono">{{ when(e.at) }}</td>
        <td><span class="badge k-{{ e.kind }}">{{ e.kind }}</span></td>
        <td>{{ e.name or "" }}</td>
        <td>{{ e.thread_id or "" }}</td>
        <td>{{ "" if e.pc is none else e.pc }}</td>
        <td>{{ "" if e.attempt is none else e.attempt }}</td>
        <td>{{ "" if e.duration is none else ms(e.duration) }}</td>
        <td>{{ e.by or "" }}</td>
        <td class="json">{% if e.input is not none %}
          <code>{{ compact(e.input) }}</code>{% endif %}</td>
        <td class="json">{% if e.output is not none %}
          <code>{{ compact(e.output) }}</code>{% endif %}</td>
        <td>{% if e.error %}<span class="problem">{{ e.error }}</span>{% endif %}</td>
      </tr>
    {% else %}
      <tr><td class="empty" colspan="11">No history kept for this instance.</td></tr>
    {% endfor %}
    </tbody>
  </table>
  {% endif %}
</div>
{% endblock %}
"""

_LOGIN = """\
{% extends "base" %}
{% block main %}
<div class="card login">
  <h1>Sign in</h1>
  {% if message %}<p class="problem" id="login-error">{{ message }}</p>{% endif %}
  {% if can_login %}
  <form method="post" action="{{ base }}/inspect/login">
    <label for="token">The API's bearer token</label>
    <input type="password" id="token" name="token" autocomplete="current-password" required>
    <button class="primary" type="submit">Open the inspector</button>
  </form>
  <p>The token is checked once; the browser then keeps a session cookie (HttpOnly,
    SameSite=Strict) for {{ ttl }}. Scripts can send
    <code>Authorization: Bearer &lt;token&gt;</code> instead.</p>
  {% else %}
  <p>{{ why }}</p>
  {% endif %}
</div>
{% endblock %}
"""

_ERROR = """\
{% extends "base" %}
{% block main %}
<div class="card">
  <h1>{{ status }} · {{ error }}</h1>
  <p class="problem" id="error-detail">{{ detail }}</p>
  <p><a href="{{ base }}/inspect">← Instances</a></p>
</div>
{% endblock %}
"""

_env = jinja2.Environment(
    loader=jinja2.DictLoader(
        {"base": _BASE, "list": _LIST, "instance": _INSTANCE, "login": _LOGIN, "error": _ERROR}
    ),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


# --------------------------------------------------------------------------- formatting


def when(at: datetime) -> str:
    """``2025-03-01 14:05:09 UTC``."""
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


_UNITS = (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))


def approximate(seconds: float) -> str:
    """A duration in its two largest units, rounded: ``3d``, ``2d 4h``, ``5m 30s``, ``12s``."""
    total = round(abs(seconds))
    for i, (_, size) in enumerate(_UNITS):
        if total >= size:
            step = _UNITS[min(i + 1, len(_UNITS) - 1)][1]
            total = round(total / step) * step
            break
    parts: list[str] = []
    for suffix, size in _UNITS:
        if total >= size and len(parts) < 2:
            parts.append(f"{total // size}{suffix}")
            total %= size
        elif parts:
            break
    return " ".join(parts) or "0s"


def relative(at: datetime) -> str:
    """``in 3d`` or ``2h 5m ago``, from now."""
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    seconds = (at - clock.now()).total_seconds()
    if abs(seconds) < 1:
        return "now"
    text = approximate(seconds)
    return f"in {text}" if seconds > 0 else f"{text} ago"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def pretty(value: Any) -> str:
    """Indented JSON, cut at :data:`MAX_JSON` characters."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=False)
    if len(text) > MAX_JSON:
        return text[:MAX_JSON] + f"\n… cut at {MAX_JSON} characters (the JSON API has it all)"
    return text


def compact(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    type: str
    required: bool


def _type_of(schema: Mapping[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "type" in schema:
        kind = schema["type"]
        if kind == "array" and isinstance(schema.get("items"), Mapping):
            return f"array of {_type_of(schema['items'])}"
        return " | ".join(kind) if isinstance(kind, list) else str(kind)
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list):
            return " | ".join(_type_of(o) for o in options if isinstance(o, Mapping))
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    return "any"


def fields(schema: Mapping[str, Any]) -> list[Field]:
    """The top-level fields of an object schema (name, type, required); [] for others."""
    props = schema.get("properties")
    if not isinstance(props, Mapping):
        return []
    required = set(schema.get("required", ()))
    return [
        Field(str(name), _type_of(sub) if isinstance(sub, Mapping) else "any", name in required)
        for name, sub in props.items()
    ]


_env.globals.update(
    css=Markup(CSS),
    when=when,
    relative=relative,
    ms=ms,
    pretty=pretty,
    compact=compact,
    fields=fields,
)


# --------------------------------------------------------------------------- pages


@dataclass(frozen=True, slots=True)
class Row:
    item: Summary
    href: str


def list_page(
    *,
    base: str,
    logout: bool,
    workflows: Sequence[str],
    workflow: str,
    status: str,
    q: str,
    limit: int,
    limits: Sequence[int],
    rows: Sequence[Row],
    first_href: str | None,
    next_href: str | None,
    scanned: int,
) -> str:
    return _env.get_template("list").render(
        title="Instances",
        base=base,
        logout=logout,
        workflows=workflows,
        workflow=workflow,
        statuses=[s.value for s in InstanceStatus],
        status=status,
        q=q,
        limit=limit,
        limits=limits,
        rows=rows,
        first_href=first_href,
        next_href=next_href,
        scanned=scanned,
    )


@dataclass(slots=True)
class InstanceView:
    """What the instance page shows; each part may be missing, with the reason why."""

    id: str
    workflow: str
    status: str
    snap: Snapshot | None = None
    diagram: Markup | None = None
    diagram_problem: str = ""
    history: History | None = None
    history_problem: str = ""
    problems: list[str] = field(default_factory=list)


def instance_page(view: InstanceView, *, base: str, logout: bool, list_href: str) -> str:
    return _env.get_template("instance").render(
        title=view.id,
        base=base,
        logout=logout,
        list_href=list_href,
        id=view.id,
        workflow=view.workflow,
        status=view.status,
        snap=view.snap,
        diagram=view.diagram,
        diagram_problem=view.diagram_problem,
        history=view.history,
        history_problem=view.history_problem,
        problems=view.problems,
    )


def login_page(*, base: str, can_login: bool, message: str, why: str, ttl: str) -> str:
    return _env.get_template("login").render(
        title="Sign in",
        base=base,
        logout=False,
        can_login=can_login,
        message=message,
        why=why,
        ttl=ttl,
    )


def error_page(*, base: str, logout: bool, status: int, error: str, detail: str) -> str:
    return _env.get_template("error").render(
        title=f"{status} {error}",
        base=base,
        logout=logout,
        status=status,
        error=error,
        detail=detail,
    )
