"""Escapers for untrusted text (target names, ASN names, summaries) in each output format.

Untrusted text must never become a Slack mention or link, an HTML element, or a new mail header. Each function
here is total and idempotence is *not* assumed: escape exactly once, at the point the format is known.
"""

from __future__ import annotations

import html
import re
from urllib.parse import quote

# C0/C1 controls, DEL, Unicode line/paragraph separators and bidi overrides (spoofing) become a space.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_SAFE_URL = re.compile(r"^https?://[^\s<>|\"'`]+$")


def one_line(text: str) -> str:
    """Collapse controls (CR, LF, tabs, bidi overrides) so a value stays on one line wherever it is shown."""
    return " ".join(_CONTROLS.sub(" ", text).split())


def slack(text: str) -> str:
    """Slack mrkdwn: only ``&``, ``<``, ``>`` are special (``<!channel>``, ``<url|label>``), per Slack."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def html_text(text: str) -> str:
    """HTML element content and attribute values (quotes included)."""
    return html.escape(text, quote=True)


def header(text: str, limit: int = 200) -> str:
    """A mail header value: one line, no controls, bounded (email.message folds and encodes the rest)."""
    value = one_line(text)
    return value if len(value) <= limit else value[: limit - 1] + "…"


def safe_url(url: str) -> str | None:
    """A URL fit for a link (http/https, no spaces or link-breaking characters after quoting), else None."""
    url = one_line(url)
    quoted = quote(url, safe=":/?&=%#+,;@~!$*()'[]-._")
    quoted = quoted.replace("'", "%27")
    if not _SAFE_URL.match(quoted):
        return None
    return quoted


def slack_link(url: str, label: str) -> str:
    """``<url|label>``, URL checked and label escaped; a bad URL degrades to plain escaped text."""
    good = safe_url(url)
    text = slack(one_line(label)).replace("|", "¦")
    if good is None:
        return text
    return f"<{slack(good)}|{text}>"


def html_link(url: str, label: str) -> str:
    good = safe_url(url)
    if good is None:
        return html_text(label)
    return f'<a href="{html_text(good)}">{html_text(label)}</a>'
