"""The main job end to end on a small corpus: both methods, report table and plot."""
from __future__ import annotations

from megareweight.demo import run_demo


def test_demo_writes_report(corpus_dir, tmp_path):
    report = run_demo(tmp_path / "demo", corpus=corpus_dir, seeds=2, steps=3, progress=False, vocab_size=320)
    text = report.read_text()
    assert "| domain | kind | uniform | linupper | linupper - uniform [95 % CI] | verdict |" in text
    assert "| **average** | trained |" in text and "| **average** | held out |" in text
    # power is stated, verdicts come from the paired t-interval, and the powered experiment is linked
    assert "With 2 paired seeds the 95 % interval is the mean difference ± 12.71 x sd / sqrt(2)" in text
    assert "experiments/reweighting/README.md" in text and "within 1 sd" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows[-2:]] == ["| **average**", "| **average**"]
    for row in rows:
        verdict = row.rstrip(" |").rsplit("| ", 1)[1]
        assert verdict in ("inconclusive", "linupper better", "uniform better"), row
    assert (tmp_path / "demo" / "report.png").stat().st_size > 10_000
    runs = sorted(p.name for p in (tmp_path / "demo" / "runs").iterdir())
    assert runs == ["linupper-seed0", "linupper-seed1", "uniform-seed0", "uniform-seed1"]
    # re-running reuses the finished runs
    mtime = (tmp_path / "demo" / "runs" / "uniform-seed0" / "summary.json").stat().st_mtime
    run_demo(tmp_path / "demo", corpus=corpus_dir, seeds=2, steps=3, progress=False, vocab_size=320)
    assert (tmp_path / "demo" / "runs" / "uniform-seed0" / "summary.json").stat().st_mtime == mtime
