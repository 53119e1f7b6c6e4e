"""A node's text rendered as txt, md, json, csv, html, pdf or docx.

Node output is usually an LLM answer, i.e. markdown: html and pdf render it, docx maps its
headings, lists, code blocks and bold; txt, md, json and csv keep the text as data. The PDF uses
DejaVu Sans (Debian's ``fonts-dejavu-core``, on every machine image of this project, or
``FLUX_PDF_FONT_DIR``) so any Latin, Greek or Cyrillic text prints; glyphs DejaVu lacks (CJK,
emoji) are left out with a warning. Without those fonts the PDF falls back to the built-in
Helvetica, which is Latin-1 only: other characters are transliterated where Unicode allows, else
printed as ``?``.
"""

from __future__ import annotations

import csv
import html
import io
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flux_dagster import settings
from flux_dagster.errors import UserConfigError

CONTENT_TYPES = {
    "txt": "text/plain; charset=utf-8",
    "md": "text/markdown; charset=utf-8",
    "json": "application/json",
    "csv": "text/csv; charset=utf-8",
    "html": "text/html; charset=utf-8",
    "pdf": "application/pdf",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
}
MAX_NAME_CHARS = 100
MARKDOWN_EXTENSIONS = ["tables", "fenced_code", "sane_lists"]
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/usr/share/fonts/TTF")
FONT_FILES = {"": "DejaVuSans.ttf", "B": "DejaVuSans-Bold.ttf", "I": "DejaVuSans-Oblique.ttf",
              "BI": "DejaVuSans-BoldOblique.ttf"}
MONO_FONT_FILE = "DejaVuSansMono.ttf"


@dataclass(frozen=True)
class RenderedFile:
    content: bytes
    file_type: str
    content_type: str


def normalize_file_type(value: Any, field: str = "fileType") -> str:
    """``"PDF"``, ``".pdf"`` and ``"pdf"`` are the same type; anything unsupported is the user's to fix."""
    file_type = str(value or "").strip().lstrip(".").lower()
    if file_type not in CONTENT_TYPES:
        raise UserConfigError(
            f"The file type {value!r} is not supported; use one of: {', '.join(CONTENT_TYPES)}.", field=field
        )
    return file_type


_UNSAFE_NAME_CHARS = re.compile(r"[^\w.-]+")


def safe_name(value: Any, file_type: str | None = None) -> str:
    """A file name or key segment without path parts, separators or leading dots ("" if nothing is left).

    A trailing ``.<file_type>`` is dropped, since the extension is added back by the caller."""
    name = unicodedata.normalize("NFC", re.split(r"[\\/]", str(value or ""))[-1].strip())
    if file_type and name.lower().endswith(f".{file_type}"):
        name = name[: -len(file_type) - 1]
    return _UNSAFE_NAME_CHARS.sub("_", name).strip("._-")[:MAX_NAME_CHARS].rstrip("._-")


def key_segment(value: Any) -> str:
    """One segment of a store key: separators and unsafe characters become ``_``, never empty."""
    return _UNSAFE_NAME_CHARS.sub("_", str(value or "")).strip("._-")[:MAX_NAME_CHARS] or "_"


def render(text: str, file_type: str, *, title: str) -> RenderedFile:
    file_type = normalize_file_type(file_type)
    # Lone surrogates (seen in JSON-decoded node data) cannot be encoded by any format.
    text = text.encode("utf-8", "replace").decode("utf-8")
    content = _RENDERERS[file_type](text, title)
    return RenderedFile(content=content, file_type=file_type, content_type=CONTENT_TYPES[file_type])


def _plain(text: str, _title: str) -> bytes:
    return text.encode("utf-8")


_FENCED = re.compile(r"\s*```[\w+-]*[ \t]*\n(.*?)\n?```\s*", re.S)


def _unfenced(text: str) -> str:
    """The body of an answer that is one fenced code block (LLMs wrap JSON and CSV that way)."""
    match = _FENCED.fullmatch(text)
    return match.group(1) if match else text


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json(text: str, _title: str) -> bytes:
    body = _unfenced(text).strip()
    try:
        json.loads(body, parse_constant=_reject_constant)
    except ValueError:
        return json.dumps(text, ensure_ascii=False).encode("utf-8")
    return body.encode("utf-8")


def _csv(text: str, _title: str) -> bytes:
    body = _unfenced(text).strip("\r\n")
    try:
        rows = [row for row in csv.reader(io.StringIO(body)) if row]
    except csv.Error:
        rows = []
    if len(rows) >= 2 and len(rows[0]) >= 2 and all(len(row) == len(rows[0]) for row in rows):
        return (body + "\n").encode("utf-8")
    out = io.StringIO()
    csv.writer(out).writerows([line] for line in text.splitlines() if line.strip())
    return out.getvalue().encode("utf-8")


_HTML_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:48em;margin:2em auto;padding:0 1em;line-height:1.5}"
    "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.3em .6em}"
    "pre{background:#f5f5f5;padding:1em;overflow:auto}"
)


def _html(text: str, title: str) -> bytes:
    if re.match(r"\s*(<!doctype html|<html[\s>])", text, re.I):
        return text.encode("utf-8")
    import markdown

    body = markdown.markdown(text, extensions=MARKDOWN_EXTENSIONS)
    page = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_HTML_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
    return page.encode("utf-8")


def unicode_font_dir() -> Path | None:
    """The first folder holding every DejaVu file the PDF needs."""
    override = settings.env("FLUX_PDF_FONT_DIR")
    for folder in ([override] if override else []) + list(FONT_DIRS):
        path = Path(folder)
        if all((path / name).is_file() for name in (*FONT_FILES.values(), MONO_FONT_FILE)):
            return path
    return None


_TYPOGRAPHY = str.maketrans({"\u2013": "-", "\u2014": "-", "\u2018": "'", "\u2019": "'", "\u201c": '"',
                             "\u201d": '"', "\u2022": "*", "\u2192": "->"})


def to_latin1(text: str) -> str:
    """What the built-in PDF fonts can print: accents dropped where that helps, else ``?``."""
    out = []
    for char in text.translate(_TYPOGRAPHY):
        if ord(char) < 256:
            out.append(char)
        else:
            out.append(unicodedata.normalize("NFKD", char).encode("latin-1", "ignore").decode("latin-1") or "?")
    return "".join(out)


def _markdown_for_pdf(text: str) -> str:
    import markdown

    converter = markdown.Markdown(extensions=MARKDOWN_EXTENSIONS)
    # fpdf2 would fetch <img> sources (URLs or local paths) while laying out: never let node text
    # choose what the worker reads. Raw HTML is shown as text for the same reason.
    for name in ("image_link", "image_reference", "short_image_ref", "html"):
        converter.inlinePatterns.deregister(name)
    converter.preprocessors.deregister("html_block")
    return converter.convert(text)


def _pdf_document(text: str, title: str, *, as_markdown: bool) -> bytes:
    from fpdf import FPDF
    from fpdf.fonts import FontFace
    from fpdf.html import DEFAULT_TAG_STYLES

    pdf = FPDF()
    pdf.set_title(title)
    pdf.set_creator("FluxPrompt worker")
    font_dir = unicode_font_dir()
    if font_dir is not None:
        for style, name in FONT_FILES.items():
            pdf.add_font("DejaVu", style, str(font_dir / name))
        pdf.add_font("DejaVuMono", "", str(font_dir / MONO_FONT_FILE))
        family, mono = "DejaVu", "DejaVuMono"
    else:
        family, mono, text = "helvetica", "courier", to_latin1(text)
    pdf.add_page()
    pdf.set_font(family, size=11)
    if as_markdown:
        pdf.write_html(
            _markdown_for_pdf(text),
            tag_styles={"code": FontFace(family=mono), "pre": DEFAULT_TAG_STYLES["pre"].replace(font_family=mono)},
        )
    else:
        pdf.multi_cell(0, None, text)
    return bytes(pdf.output())


def _pdf(text: str, title: str) -> bytes:
    try:
        return _pdf_document(text, title, as_markdown=True)
    except Exception:  # noqa: BLE001 - fpdf2 raises several types for HTML it cannot lay out
        # It lays out a subset of HTML (and refuses links to anchors it never saw): such text
        # still gets its file, unformatted.
        return _pdf_document(text, title, as_markdown=False)


# Characters XML 1.0 forbids; python-docx refuses them.
_XML_INVALID = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_HEADING = re.compile(r"(#{1,6})\s+(.*)")
_BULLET = re.compile(r"\s*[-*+]\s+(.*)")
_NUMBERED = re.compile(r"\s*\d+[.)]\s+(.*)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _docx(text: str, title: str) -> bytes:
    from docx import Document

    doc = Document()
    doc.core_properties.title = title

    def add_text(lines: list[str], style: str | None = None) -> None:
        paragraph = doc.add_paragraph(style=style)
        for i, part in enumerate(_BOLD.split("\n".join(lines))):  # odd parts were inside **…**
            if part:
                paragraph.add_run(part).bold = True if i % 2 else None

    def add_code(lines: list[str]) -> None:
        doc.add_paragraph().add_run("\n".join(lines)).font.name = "Courier New"

    open_lines: list[str] = []  # the paragraph being read
    code: list[str] | None = None

    def end_paragraph() -> None:
        if open_lines:
            add_text(open_lines)
            open_lines.clear()

    for line in _XML_INVALID.sub("", text).splitlines():
        fence = line.strip().startswith("```")
        if code is not None:
            if fence:
                add_code(code)
                code = None
            else:
                code.append(line)
        elif fence:
            end_paragraph()
            code = []
        elif not line.strip():
            end_paragraph()
        elif match := _HEADING.fullmatch(line):
            end_paragraph()
            doc.add_heading(match.group(2), level=len(match.group(1)))
        elif match := _BULLET.fullmatch(line):
            end_paragraph()
            add_text([match.group(1)], "List Bullet")
        elif match := _NUMBERED.fullmatch(line):
            end_paragraph()
            add_text([match.group(1)], "List Number")
        else:
            open_lines.append(line)
    end_paragraph()
    if code is not None:  # an unclosed fence still shows its code
        add_code(code)
    out = io.BytesIO()
    doc.save(out)
    return out.getvalue()


_RENDERERS: dict[str, Callable[[str, str], bytes]] = {
    "txt": _plain,
    "md": _plain,
    "json": _json,
    "csv": _csv,
    "html": _html,
    "pdf": _pdf,
    "docx": _docx,
}
