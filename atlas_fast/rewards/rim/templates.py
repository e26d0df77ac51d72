"""Judge prompt templates with safe substitution.

`str.format` reads every brace of the template *and* fails on templates whose literal text holds
JSON examples; inputs that hold braces (code, LaTeX, JSON answers) must never be parsed at all.
Here only `{name}` placeholders whose name is a known field are substituted, in a single pass over
the template, and the substituted values are never scanned again. Every other brace is literal
text, so templates may show the judge nested JSON examples as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = ["PromptTemplate"]

_TOKEN = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class PromptTemplate:
    """A template over a fixed set of field names.

    A `{word}` that is not a known field is a config error (raised on construction), because it
    is almost always a misspelt field that would otherwise reach the judge verbatim.
    """

    def __init__(self, text: str, fields: Iterable[str], *, name: str = "template") -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name}: a prompt template must be a non-empty string.")
        self.text = text
        self.name = name
        self.fields = frozenset(fields)
        self.placeholders = frozenset(m.group(1) for m in _TOKEN.finditer(text))
        unknown = sorted(self.placeholders - self.fields)
        if unknown:
            raise ValueError(
                f"{name}: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
                f"known fields: {', '.join(sorted(self.fields))}."
            )

    def render(self, values: Mapping[str, str]) -> str:
        missing = sorted(self.placeholders - set(values))
        if missing:
            raise ValueError(f"{self.name}: no value for {', '.join(missing)}.")
        return _TOKEN.sub(lambda m: str(values[m.group(1)]), self.text)

    def __repr__(self) -> str:
        return f"PromptTemplate({self.name!r}, placeholders={sorted(self.placeholders)})"
