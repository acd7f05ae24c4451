"""The report's Markdown rendered as one self-contained HTML page.

Text read from files (class names, paths, notices) is in the Markdown already escaped
(escape.markdown_text, escape.markdown_code), so it opens no tag, link, picture, code span or
table cell. `page` renders exactly the subset of Markdown the report writes and passes every
other character through escape.html_text; every picture is inlined as a data: URI, so
report.html is one file to send.
"""
import base64
import os
import re

from ..config import UserError
from ..fs import files
from ..fs.escape import html_text

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)]+)\)$")
_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
          "line-height:1.4;color:#222}h2{border-top:2px solid #ddd;padding-top:.8em;"
          "margin-top:2em}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid "
          "#ccc;padding:.25em .6em}th{background:#f0f3f7}tbody tr:nth-child(even){background:"
          "#fafafa}.n{text-align:right;font-variant-numeric:tabular-nums}"
          "img{max-width:100%}.fig{display:inline-block;vertical-align:top;"
          "margin:.5em 1.5em .5em 0}table{display:inline-table;vertical-align:top}"
          "h3{margin-top:1.5em}blockquote{background:#fee;padding:.5em 1em;"
          "border-left:4px solid #c00}code{background:#f4f4f4}.toc{background:#f6f8fa;"
          "padding:.6em 1em;border-radius:4px;line-height:1.8}.toc a{color:#0550ae;"
          "text-decoration:none}")


def page(lines, folder, title):
    """The report's Markdown lines as one HTML page. Only what this module writes is rendered:
    headings, paragraphs, tables, a picture alone on a line, `> ` warnings; inline, backslash
    escapes, code spans and **bold**. Every other character is escaped, and every picture is
    read (a regular file inside `folder` only) and inlined as a data: URI. The "## " sections
    are listed under the title, each linked within the page (href="#s<N>", nothing outside)."""
    body, paragraph, table, aligns, sections = [], [], [], [], []

    def flush():
        if paragraph:
            body.append("<p>" + " ".join(paragraph) + "</p>")
            paragraph.clear()
        if table:
            head, *rest = table

            def row(cells, tag):
                kinds = [' class="n"' if right else "" for right in aligns]
                kinds += [""] * len(cells)
                return "<tr>" + "".join(f"<{tag}{kind}>{c}</{tag}>"
                                        for c, kind in zip(cells, kinds)) + "</tr>"
            body.append("<table>" + (f"<thead>{row(head, 'th')}</thead>" if any(head) else "")
                        + "<tbody>" + "".join(row(r, "td") for r in rest) + "</tbody></table>")
            table.clear()
            aligns.clear()

    for line in lines:
        picture = _IMAGE.match(line)
        if line.startswith("|"):
            if paragraph:
                flush()
            rule = line.replace(" ", "")
            if re.fullmatch(r"\|(:?-+:?\|)+", rule):  # the rule under the header: "---:" is
                aligns[:] = [c.endswith(":") for c in rule[1:-1].split("|")]  # right-aligned
            else:
                table.append([_inline(c.strip()) for c in _cells(line)])
            continue
        if table:
            flush()
        if not line.strip():
            flush()
        elif line.startswith("#"):
            flush()
            level = len(line) - len(line.lstrip("#"))
            text = _inline(line[level:].strip())
            if level == 2:  # listed in the contents, linked within the page
                sections.append(text)
                body.append(f'<h2 id="s{len(sections)}">{text}</h2>')
            else:
                body.append(f"<h{level}>{text}</h{level}>")
        elif picture:
            flush()
            body.append(f'<p class="fig"><img alt="{html_text(picture.group(1))}" '
                        f'src="{_data_uri(folder, picture.group(2))}"></p>')
        elif line.startswith("> "):
            flush()
            body.append(f"<blockquote>{_inline(line[2:])}</blockquote>")
        else:
            paragraph.append(_inline(line))
    flush()
    if sections:  # the contents, under the title: a long page, read in any order
        body.insert(1, '<nav class="toc">' + " · ".join(
            f'<a href="#s{i}">{text}</a>' for i, text in enumerate(sections, 1)) + "</nav>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html_text(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _cells(line):
    """A table line's cells, split at the | that no backslash escapes."""
    return re.split(r"(?<!\\)\|", line.strip()[1:-1])


def _inline(text):
    """Markdown inline text of this module as HTML: \\x is x, `code` and **bold**."""
    out, i, bold = [], 0, False
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(html_text(text[i + 1]))
            i += 2
        elif c == "`":
            fence = re.match("`+", text[i:]).group(0)
            end = text.find(fence, i + len(fence))
            if end < 0:
                out.append(html_text(text[i:]))
                break
            out.append(f"<code>{html_text(text[i + len(fence):end].strip())}</code>")
            i = end + len(fence)
        elif text.startswith("**", i):
            out.append("</strong>" if bold else "<strong>")
            bold, i = not bold, i + 2
        else:
            out.append(html_text(c))
            i += 1
    return "".join(out) + ("</strong>" if bold else "")


def _data_uri(folder, relative):
    """A PNG of the report's folder as a data: URI; a missing one as an empty picture."""
    path = os.path.normpath(os.path.join(folder, relative))
    if os.path.commonpath([os.path.abspath(path), os.path.abspath(folder)]) != \
            os.path.abspath(folder):
        return "data:,"
    try:
        with files.open_regular(path, "rb") as f:
            return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")
    except (OSError, UserError):
        return "data:,"
