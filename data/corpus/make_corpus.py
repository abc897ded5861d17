"""Rebuild data/corpus/{train,validation}.txt from the Python 3.11 documentation sources.

Usage (no network needed beyond the Debian archive):

    apt-get download python3.11-doc
    dpkg -x python3.11-doc_*.deb /tmp/pydoc
    python data/corpus/make_corpus.py /tmp/pydoc [--output_dir data/corpus]

The argument may be the extracted package root or its `html/_sources` directory. The script keeps the prose of
the reStructuredText sources (tutorial, HOWTOs, FAQ, What's New, language reference, setup and extending guides)
and drops code blocks, doctests, directives, comments, tables, field lists and inline markup.

Output format: one document per documentation section (the text between two headings), one paragraph per line,
a blank line between documents. Every twentieth document goes to validation.txt, the rest to train.txt.
"""
import argparse
import re
import sys
from pathlib import Path

SECTIONS = ("tutorial", "howto", "faq", "whatsnew", "reference", "using", "extending", "installing", "distributing")
SKIPPED_PAGES = {"changelog.rst.txt", "index.rst.txt"}  # changelog: bug titles, not prose; index: tables of contents
VALIDATION_EVERY = 20
MIN_DOCUMENT_CHARS = 300
MIN_PARAGRAPH_WORDS = 6

UNDERLINE = re.compile(r"^([=\-~^*#\"'`+:.])\1{2,}\s*$")
TABLE_LINE = re.compile(r"^\s*(\+[-=+]+\+|[=\-]{3,}(\s+[=\-]{3,})+|\|.*\|)\s*$")
BULLET = re.compile(r"^\s*([*\-+•]|#\.|\d+\.|\(?[a-z0-9]\))\s+")
FIELD = re.compile(r"^\s*:[\w \-]+:(\s|$)")

INLINE_RULES = [
    (re.compile(r":pep:`(\d+)`"), lambda m: f"PEP {m.group(1)}"),
    (re.compile(r":(issue|gh):`(\d+)`"), lambda m: f"{'bpo' if m.group(1) == 'issue' else 'gh'}-{m.group(2)}"),
    (re.compile(r":[\w:+-]+:`~?!?[^`<]*?<([^`>]*)>`"), lambda m: m.group(0).split("`")[1].split("<")[0].strip()),
    (re.compile(r":[\w:+-]+:`~([^`]*)`"), lambda m: m.group(1).rsplit(".", 1)[-1]),
    (re.compile(r":[\w:+-]+:`!?([^`]*)`"), lambda m: m.group(1)),
    (re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?"), lambda m: m.group(1)),
    (re.compile(r"``([^`]+)``"), lambda m: m.group(1)),
    (re.compile(r"`([^`]+)`_{0,2}"), lambda m: m.group(1)),
    (re.compile(r"\b([A-Za-z][A-Za-z0-9]*)_(?=[\s.,;:)]|$)"), lambda m: m.group(1)),  # bare `Name_` references
    (re.compile(r"\*\*([^*]+)\*\*"), lambda m: m.group(1)),
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])"), lambda m: m.group(1)),
    (re.compile(r"\s*\[(#\w*|\d+|\*)\]_"), lambda m: ""),
    (re.compile(r"\|(version|release)\|"), lambda m: "3.11"),
    (re.compile(r"\\ "), lambda m: ""),
    (re.compile(r"\\([^\w\s])"), lambda m: m.group(1)),
    (re.compile(r"\s+"), lambda m: " "),
    # The package index by name, not address: this project's files name no package index's host.
    (re.compile(r"https?://pypi\.org(?:/[^\s]*?)?(?=[.:,;)]?(?:\s|$))"), lambda m: "the Python Package Index"),
]


def strip_inline_markup(text):
    for pattern, replacement in INLINE_RULES:
        text = pattern.sub(replacement, text)
    return text.strip()


def indent_of(line):
    return len(line) - len(line.lstrip(" "))


def paragraphs(lines):
    """Yield blocks of consecutive non-blank lines."""
    block = []
    for line in lines:
        if line.strip():
            block.append(line.rstrip("\n").expandtabs(8))
        elif block:
            yield block
            block = []
    if block:
        yield block


def is_heading(block):
    return len(block) in (2, 3) and UNDERLINE.match(block[-1]) and len(block[-1].strip()) >= len(block[-2].strip())


def looks_like_prose(text):
    words = text.split()
    if len(words) < MIN_PARAGRAPH_WORDS or text[-1] not in ".:!?)\"'":
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters / len(text) > 0.85 and not text.startswith((">>>", "$ ", "%"))


def page_documents(path):
    """Split one documentation page into documents (sections) of prose paragraphs."""
    documents, current = [], []
    skip_deeper_than = None  # indentation of a directive, comment or `::` paragraph whose body we drop
    for block in paragraphs(path.read_text(encoding="utf-8").splitlines()):
        indent = indent_of(block[0])
        if skip_deeper_than is not None:
            if indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        first = block[0].strip()
        if is_heading(block):
            documents.append(current)
            current = []
            continue
        if first.startswith(".."):
            skip_deeper_than = indent
            continue
        if any(TABLE_LINE.match(line) for line in block) or FIELD.match(block[0]) or first.startswith(">>>"):
            continue
        text = " ".join(line.strip() for line in block)
        if text.endswith("::"):
            skip_deeper_than = indent
            text = text[:-2].rstrip() + (":" if not text[:-2].endswith(" ") else "")
        text = strip_inline_markup(BULLET.sub("", text, count=1))
        if text and looks_like_prose(text):
            current.append(text)
    documents.append(current)
    return [doc for doc in documents if sum(len(p) for p in doc) >= MIN_DOCUMENT_CHARS]


def find_sources(root):
    for candidate in (root, root / "html" / "_sources", root / "usr/share/doc/python3.11-doc/html/_sources"):
        if (candidate / "tutorial").is_dir():
            return candidate
    sys.exit(f"error: no html/_sources with a tutorial/ directory under {root}; pass the extracted python3.11-doc")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package_dir", type=Path, help="extracted python3.11-doc package (or its html/_sources)")
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    sources = find_sources(args.package_dir)
    documents = []
    for section in SECTIONS:
        for page in sorted((sources / section).glob("*.rst.txt")):
            if page.name not in SKIPPED_PAGES:
                documents.extend(page_documents(page))
    splits = {"train": [], "validation": []}
    for index, document in enumerate(documents):
        splits["validation" if index % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"].append(document)
    for name, docs in splits.items():
        text = "\n\n".join("\n".join(doc) for doc in docs) + "\n"
        (args.output_dir / f"{name}.txt").write_text(text, encoding="utf-8")
        print(f"{name}.txt: {len(docs)} documents, {len(text.encode()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
