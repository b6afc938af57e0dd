"""Tests of the corpus builder: pure pieces on synthetic inputs, one offline end-to-end build.

Tests that download packages are marked ``network`` and run only with MEGAREWEIGHT_NETWORK_TESTS=1.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import warnings

import pytest

from megareweight.data import corpus_build as cb
from megareweight.data import corpus_sources as cs
from megareweight.data.corpus_build import (
    MANIFEST_NAME,
    CorpusBuildWarning,
    MinHashLSH,
    build_corpus,
    clean_text,
    cut_at_paragraph,
    normalise_for_hash,
    select_documents,
)
from megareweight.data.corpus_sources import Doc

network = pytest.mark.skipif(os.environ.get("MEGAREWEIGHT_NETWORK_TESTS") != "1",
                             reason="needs PyPI/Debian; set MEGAREWEIGHT_NETWORK_TESTS=1")


# --------------------------------------------------------------------------------------------
# dictd


def _b64(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = alphabet[n % 64]
    n //= 64
    while n:
        out = alphabet[n % 64] + out
        n //= 64
    return out


def test_dictd_b64_numbers():
    assert cs.dictd_b64_decode("A") == 0
    assert cs.dictd_b64_decode("B") == 1
    assert cs.dictd_b64_decode("/") == 63
    assert cs.dictd_b64_decode("BA") == 64
    assert cs.dictd_b64_decode("B//") == 64 * 64 + 63 * 64 + 63
    for n in (0, 5, 63, 64, 4095, 123456789):
        assert cs.dictd_b64_decode(_b64(n)) == n
    with pytest.raises(ValueError):
        cs.dictd_b64_decode("a=")


def test_dictd_split_at_index_offsets(tmp_path):
    entries = ["00-database-info\n  metadata that must be skipped\n",
               "apple\n   n 1: a fruit\n",
               "caf\u00e9\n   n 1: a small restaurant\n",
               "zebra\n   n 1: a striped animal\n"]
    data = "".join(entries).encode("utf-8")
    offsets, pos = [], 0
    for e in entries:
        offsets.append((pos, len(e.encode("utf-8"))))
        pos += len(e.encode("utf-8"))
    index = "\n".join([
        f"00-database-info\t{_b64(offsets[0][0])}\t{_b64(offsets[0][1])}",
        f"apple\t{_b64(offsets[1][0])}\t{_b64(offsets[1][1])}",
        f"pomme\t{_b64(offsets[1][0])}\t{_b64(offsets[1][1])}",  # alias: same span, kept once
        f"zebra\t{_b64(offsets[3][0])}\t{_b64(offsets[3][1])}",
        f"caf\u00e9\t{_b64(offsets[2][0])}\t{_b64(offsets[2][1])}",
    ]) + "\n"
    (tmp_path / "t.index").write_text(index, encoding="utf-8")
    (tmp_path / "t.dict.dz").write_bytes(gzip.compress(data))

    parsed = cs.parse_dictd_index((tmp_path / "t.index").read_text("utf-8"))
    assert parsed[1] == ("apple", offsets[1][0], offsets[1][1])
    out = cs.dictd_entries((tmp_path / "t.index").read_text("utf-8"),
                           gzip.decompress((tmp_path / "t.dict.dz").read_bytes()))
    assert out == ["apple\n   n 1: a fruit", "caf\u00e9\n   n 1: a small restaurant",
                   "zebra\n   n 1: a striped animal"]
    with pytest.raises(ValueError, match="line 1"):
        cs.parse_dictd_index("only-one-field\n")


def test_chunk_paragraphs_keeps_whole_entries():
    paras = [f"entry {i}\n  " + "x" * 30 for i in range(10)]
    chunks = cs.chunk_paragraphs(paras, 100)
    assert "\n\n".join(chunks) == "\n\n".join(paras)
    assert all(len(c) <= 100 for c in chunks)
    assert len(chunks) == 5
    assert cs.chunk_paragraphs(["y" * 500], 100) == ["y" * 500]  # an oversized one stays whole


# --------------------------------------------------------------------------------------------
# licences, metamath, bible, gcide json, docstrings


def test_strip_yaml_front_matter():
    text = "---\nkey: mit\nname: MIT License\nother_urls:\n  - http://x\n---\nPermission is hereby granted\n---\nend\n"
    assert cs.strip_yaml_front_matter(text) == "Permission is hereby granted\n---\nend\n"
    plain = "No front matter here\n---\nnot yaml\n---\n"
    assert cs.strip_yaml_front_matter(plain) == plain
    assert cs.strip_yaml_front_matter("---\nkey: only-metadata\n---") == ""


def test_strip_metamath_proofs():
    mm = ("  $( Theorem about $= in a comment; must survive. $)\n"
          "  th1 $p |- ( ph -> ph ) $=\n      ( wi ax-1 ax-mp ) AAABZCD $.\n\n"
          "  th2 $p |- ps $= wps wph ax-mp $.\n"
          "  ax-1 $a |- ( ph -> ( ps -> ph ) ) $.\n")
    out = cs.strip_metamath_proofs(mm)
    assert "$( Theorem about $= in a comment; must survive. $)" in out
    assert "th1 $p |- ( ph -> ph ) $.\n" in out
    assert "th2 $p |- ps $.\n" in out
    assert "ax-1 $a |- ( ph -> ( ps -> ph ) ) $." in out
    assert "AAABZCD" not in out and "ax-mp" not in out


def test_split_bible_program_output():
    text = ("\nGenesis 1\n\n  1 In the beginning God created the heaven and the earth.\n"
            "  2 And the earth was without form, and void; and darkness was upon the face of\n"
            "the deep 2\n\nGenesis 2\n\n  1 Thus the heavens and the earth were finished.\n"
            "\nExodus 1\n\n  1 Now these are the names.\n")
    books = cs.split_bible_program_output(text)
    assert [b for b, _ in books] == ["Genesis", "Exodus"]
    assert books[0][1].startswith("Genesis 1\n\n  1 In the beginning")
    assert "Genesis 2" in books[0][1] and "the deep 2" in books[0][1]
    assert books[1][1] == "Exodus 1\n\n  1 Now these are the names."


def test_split_pythonbible_text():
    text = "\n1. In the beginning.\n1. Thus the heavens.\n1. Now these are the names."
    offsets = {1001001: 1, 1002001: text.index("1. Thus"), 2001001: text.index("1. Now")}
    books = cs.split_pythonbible_text(text, offsets)
    assert books == [("Genesis", "Genesis 1\n\n1. In the beginning.\n\nGenesis 2\n\n1. Thus the heavens."),
                     ("Exodus", "Exodus 1\n\n1. Now these are the names.")]


def test_render_gcide_json_entries():
    entries = {"q": {"entry": "q", "pos": [{"part_of_speech": "n.", "definitions": [
        {"text": "The seventeenth letter.", "examples": ["q is for quiet"]}, {"text": ""}]}]},
        "empty": {"entry": "empty", "pos": []}, "bad": "not a dict"}
    assert cs.render_gcide_json_entries(entries) == ["q\n   n. 1. The seventeenth letter.\n      e.g. q is for quiet"]


def test_python_docstrings():
    src = ('"""Module doc."""\n'
           'class A(Base):\n    """Class doc."""\n    def m(self, x=1):\n        """Method doc."""\n'
           '    def _private(self):\n        """hidden"""\n'
           'def f(a, *, b):\n    """Function\n\n    doc."""\n'
           'def g():\n    pass\n')
    out = cs.python_docstrings(src, "Help on module m:")
    assert out.startswith("Help on module m:\n\nModule doc.")
    assert "class A(Base)\n    Class doc." in out
    assert "def A.m(self, x=1)\n    Method doc." in out
    assert "def f(a, *, b)\n    Function\n\n    doc." in out
    assert "hidden" not in out and "def g" not in out
    assert cs.python_docstrings("def (:", "x") is None


# --------------------------------------------------------------------------------------------
# cleaning, cutting, dedup, selection


def test_clean_and_normalise():
    assert clean_text("\r\n\nline one  \r\nline\x00 two\t\n\n\n\n\n\nend\n\n") == "line one\nline two\n\n\nend"
    assert normalise_for_hash("Hello   WORLD\n\n\tfoo") == normalise_for_hash("hello world foo")


def test_cut_at_paragraph_boundary():
    text = "First paragraph line.\n\nSecond paragraph here.\n\nThird paragraph is long."
    assert cut_at_paragraph(text, 1000) == text
    cut = cut_at_paragraph(text, len("First paragraph line.\n\nSecond paragraph here.\n\nThird"))
    assert cut == "First paragraph line.\n\nSecond paragraph here."
    # no paragraph break in the second half: a line, then a space, then a hard cut
    assert cut_at_paragraph("aaaa bbbb\ncccc dddd", 15) == "aaaa bbbb"
    assert cut_at_paragraph("aaaaaaa bbbbbbbbb", 12) == "aaaaaaa"
    # never inside a multi-byte character
    out = cut_at_paragraph("\u00e9" * 10, 5)
    assert out == "\u00e9\u00e9" and len(out.encode()) <= 5


def _docs(n: int, size: int = 300) -> list[Doc]:
    return [Doc(f"s/{i}", f"Document {i}.\n\n" + " ".join(f"w{i}_{j}" for j in range(size // 8)), "pkg:a")
            for i in range(n)]


def test_select_dedups_and_drops_empty():
    docs = [Doc("a", "Hello world, this is a document with enough characters in it to be kept. " * 2, "p"),
            Doc("b", "HELLO   world, this is a document with enough characters in it to be kept.\n"
                     "hello world, this is a document with enough characters in it to be kept.  ", "p"),
            Doc("c", "   \n\n  ", "p"), Doc("d", "short", "p"), Doc("e", lambda: None, "p"),
            Doc("f", lambda: "Another distinct document that is long enough to be kept for sure.", "p")]
    sel = select_documents(docs, cap_bytes=10_000, seed=3, min_chars=20)
    assert sorted(s for s, _, _ in sel.docs) == ["a", "f"] or sorted(s for s, _, _ in sel.docs) == ["b", "f"]
    assert sel.dropped_duplicate == 1 and sel.dropped_empty == 3
    assert not sel.reached_cap


def test_select_caps_at_paragraph_boundary_and_is_deterministic():
    docs = _docs(50, size=1500)
    cap = 10_000
    sel = select_documents(docs, cap_bytes=cap, seed=7, domain="x", min_chars=10)
    assert sel.reached_cap and sel.cut_at_cap
    assert sel.text_bytes == sum(len(t.encode()) for _, t, _ in sel.docs) <= cap
    assert sel.text_bytes > cap - 256
    last_source, last_text, _ = sel.docs[-1]
    original = clean_text(docs[int(last_source.split("/")[1])].load())
    assert original.startswith(last_text) and last_text != original  # the crossing doc was cut
    again = select_documents(docs, cap_bytes=cap, seed=7, domain="x", min_chars=10)
    assert again.docs == sel.docs
    other = select_documents(docs, cap_bytes=cap, seed=8, domain="x", min_chars=10)
    assert [s for s, _, _ in other.docs] != [s for s, _, _ in sel.docs]


def test_select_cuts_long_documents():
    long_doc = "\n\n".join(f"Paragraph {i} " + "x" * 90 for i in range(100))
    sel = select_documents([Doc("long", long_doc, "p")], cap_bytes=100_000, max_doc_bytes=1_000, min_chars=10)
    (_, text, _), = sel.docs
    assert len(text.encode()) <= 1_000 and long_doc.startswith(text) and text.endswith("x")
    assert sel.cut_long == 1


def test_minhash_near_duplicates():
    base = " ".join(f"token{i}" for i in range(400))
    variant = base.replace("token200", "changed")
    unrelated = " ".join(f"other{i}" for i in range(400))
    lsh = MinHashLSH(seed=1)
    assert not lsh.is_duplicate(base)
    assert lsh.is_duplicate(variant)
    assert not lsh.is_duplicate(unrelated)
    docs = [Doc("a", base, "p"), Doc("b", variant, "p"), Doc("c", unrelated, "p")]
    sel = select_documents(docs, cap_bytes=10**6, near_dedup=True, min_chars=10)
    assert len(sel.docs) == 2 and sel.dropped_near_duplicate == 1
    assert len(select_documents(docs, cap_bytes=10**6, near_dedup=False, min_chars=10).docs) == 3


# --------------------------------------------------------------------------------------------
# build_corpus: offline end-to-end on the local standard library, fallback, errors


def test_build_code_domain_from_local_stdlib(tmp_path):
    out = tmp_path / "corpus"
    manifest = build_corpus(out, max_mb=0.05, sources="pypi", seed=1, progress=False, domains=["code"],
                            work_dir=tmp_path / "work")
    assert sorted(p.name for p in out.iterdir()) == ["code.jsonl", MANIFEST_NAME]
    on_disk = json.loads((out / MANIFEST_NAME).read_text())
    assert on_disk == manifest
    assert manifest["mode"] == "pypi" and manifest["requested_sources"] == "pypi"
    assert manifest["build_date"] and manifest["seed"] == 1 and manifest["cap_bytes"] == 50_000
    info = manifest["domains"]["code"]
    data = (out / "code.jsonl").read_bytes()
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["bytes"] == len(data)
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert info["documents"] == len(lines) > 0
    assert all(set(r) == {"text", "source"} and r["text"].strip() for r in lines)
    assert all(r["source"].startswith("local:python") for r in lines)
    assert info["text_bytes"] == sum(len(r["text"].encode()) for r in lines) <= 50_000
    assert info["reached_cap"]
    (src,) = info["sources"]
    assert src["kind"] == "local" and src["name"] == "python-stdlib" and src["documents"] == len(lines)

    again = build_corpus(tmp_path / "again", max_mb=0.05, sources="pypi", seed=1, progress=False,
                         domains=["code"])
    assert again["domains"]["code"]["sha256"] == info["sha256"]


def test_auto_falls_back_to_pypi_per_domain(tmp_path, monkeypatch):
    def broken(ctx):
        raise cs.FetchError("Debian package dict-gcide: command 'apt-get download dict-gcide' failed")

    def fallback(ctx):
        ctx.fetcher.local("synthetic", "1.0", "test")
        return [Doc(f"synthetic/{i}", f"Entry {i}\n   a definition that is long enough to be kept by the builder, as number {i} of many",
                    "local:synthetic")
                for i in range(20)]

    monkeypatch.setattr(cb, "debian_tools_available", lambda: True)
    monkeypatch.setitem(cs.RECIPES, "dictionary", {"full": (broken,), "pypi": (fallback,)})
    with pytest.warns(CorpusBuildWarning, match="dict-gcide"):
        manifest = build_corpus(tmp_path, max_mb=0.0005, sources="auto", progress=False, domains=["dictionary"])
    assert manifest["mode"] == "full"
    info = manifest["domains"]["dictionary"]
    assert info["mode"] == "pypi" and info["sources"][0]["name"] == "synthetic"
    assert any("falling back" in w for w in manifest["warnings"])

    with pytest.raises(cs.FetchError, match="dict-gcide"):  # an explicit full build does not fall back
        build_corpus(tmp_path, max_mb=0.0005, sources="full", progress=False, domains=["dictionary"])


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="domains"):
        build_corpus(tmp_path, domains=["poetry"], sources="pypi", progress=False)
    with pytest.raises(ValueError, match="sources"):
        build_corpus(tmp_path, sources="conda", progress=False)
    with pytest.raises(ValueError, match="max_mb"):
        build_corpus(tmp_path, max_mb=0, sources="pypi", progress=False)


def test_failing_apt_get_names_the_package(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package' \"$3\" >&2\nexit 100\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(cs.FetchError, match=r"Debian package no-such-pkg.*exit code 100"):
        cs.Fetcher(tmp_path / "work").deb("no-such-pkg")


def test_pypi_fetch_reuses_cached_artifact(tmp_path, monkeypatch):
    pypi = tmp_path / "pypi"
    pypi.mkdir()
    (pypi / "licensedcode_data-32.1.0-py3-none-any.whl").write_bytes(b"wheel")
    (pypi / "Django-4.2.16.tar.gz").write_bytes(b"sdist")
    monkeypatch.setattr(cs, "_run", lambda *a, **k: pytest.fail("must not download"))
    fetcher = cs.Fetcher(tmp_path)
    assert fetcher.pypi("licensedcode-data", "32.1.0").name.endswith(".whl")
    assert fetcher.pypi("django", "4.2.16", sdist=True).name == "Django-4.2.16.tar.gz"
    rec = fetcher.packages["pypi:licensedcode-data"].record()
    assert rec["version"] == "32.1.0" and rec["artifact_sha256"] == hashlib.sha256(b"wheel").hexdigest()


# --------------------------------------------------------------------------------------------
# network (opt-in)


@pytest.mark.network
@network
def test_network_legal_domain(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorpusBuildWarning)
        manifest = build_corpus(tmp_path, max_mb=0.2, sources="pypi", progress=False, domains=["legal"])
    info = manifest["domains"]["legal"]
    assert info["reached_cap"] and info["sources"][0]["name"] == "licensedcode-data"
    first = json.loads((tmp_path / "legal.jsonl").read_text().splitlines()[0])
    assert not first["text"].startswith("---")


@pytest.mark.network
@network
@pytest.mark.skipif(not cs.debian_tools_available(), reason="needs apt-get and dpkg-deb")
def test_network_full_dictionary_domain(tmp_path):
    manifest = build_corpus(tmp_path, max_mb=0.2, sources="full", progress=False, domains=["dictionary"])
    info = manifest["domains"]["dictionary"]
    assert info["mode"] == "full" and {s["name"] for s in info["sources"]} >= {"dict-gcide", "dict-wn"}
