"""The code a long experiment trains with: a ``git archive`` of one commit, unpacked once.

Why: an experiment spans sessions while the branch moves on (a sampler change alters the data
order), and paired runs must share initialisation and data order, so every run of an experiment
trains with the ``megareweight`` (and ``kernels``) code of one pinned commit, not with the working
tree. Shared by ``experiments/reweighting/lm.py`` and ``experiments/autoscale/scale_test.py``; it
is a plain file beside them (not part of the package) so that a script re-executed on an old
snapshot still finds it.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def code_snapshot(repo: Path, work: Path, commit: str) -> Path:
    """``<work>/code-<commit[:12]>`` holding ``megareweight/`` and ``kernels/`` at ``commit``
    (from 852325a on, ``megareweight/kernels`` is a link to ``kernels/`` and the archive keeps it).
    Written once, atomically: a half-written snapshot is never used."""
    root = work / f"code-{commit[:12]}"
    if (root / ".complete").is_file():
        return root
    tmp = work / f".code-{commit[:12]}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "megareweight", "kernels"], cwd=repo,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    (tmp / ".complete").write_text(commit + "\n")
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return root
