"""The project owns one import name, ``megareweight``, and works beside Hugging Face's ``kernels``.

transformers (>= 5.25) requires Hugging Face's ``kernels`` package, which owns the import name
``kernels``. The loss kernels used to be a top-level package of that name: from the repository
root ours shadowed theirs (transformers broke), from anywhere else theirs shadowed ours (training
broke). These tests run where the trouble was: subprocesses from the repository root and from
another directory, the installed ``megareweight`` command, and a regular (non-editable) install.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINT = Path(sys.executable).with_name("megareweight")


def _python(code: str, cwd: Path, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def _hf_kernels_required() -> bool:
    """True when the installed transformers depends on Hugging Face's ``kernels``."""
    from importlib import metadata

    try:
        requires = metadata.requires("transformers") or []
    except metadata.PackageNotFoundError:
        return False
    return any(r.split(";")[0].replace(" ", "").startswith(("kernels>", "kernels=", "kernels<", "kernels~"))
               or r.split(";")[0].strip() == "kernels" for r in requires if "extra ==" not in r)


def test_the_repository_claims_no_kernels_import():
    """``kernels/`` is a folder, not a package: no ``__init__.py`` that ``import kernels`` would find."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "megareweight" / "kernels").resolve() == (ROOT / "kernels").resolve()


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_kernels_is_hugging_faces_and_ours_is_megareweight_kernels(where, tmp_path):
    cwd = ROOT if where == "repo_root" else tmp_path
    code = """
import importlib.util, json
import megareweight.kernels.weighted_ce as w
import megareweight.kernels.weighted_ce.function, megareweight.kernels.weighted_ce.epilogue
import megareweight.kernels.aot, megareweight.kernels.bench
spec = importlib.util.find_spec("kernels")
hf = {}
try:
    import transformers
    from transformers import LlamaForCausalLM
    import transformers.integrations.hub_kernels
    import kernels
    hf = {"kernels": kernels.__file__, "transformers": transformers.__version__}
except ImportError as exc:
    hf = {"error": str(exc)}
print(json.dumps({"ours": w.__file__, "impl": w.get_loss_impl("chunked", "cpu")[0],
                  "kernels_spec": getattr(spec, "origin", None), **hf}))
"""
    got = json.loads(_python(code, cwd))
    assert Path(got["ours"]).resolve().is_relative_to(ROOT / "kernels") and got["impl"] == "chunked"
    if _hf_kernels_required():
        assert "error" not in got, got["error"]
        hf_file = Path(got["kernels"]).resolve()  # Hugging Face's, installed; not this repository's folder
        assert "site-packages" in hf_file.parts and not hf_file.is_relative_to(ROOT / "kernels"), got
    else:
        # No Hugging Face kernels: `import kernels` must still not find a package of this project.
        assert got["kernels_spec"] in (None, "namespace") or not Path(got["kernels_spec"]).resolve().is_relative_to(ROOT / "kernels")


@pytest.mark.skipif(not ENTRY_POINT.is_file(), reason="the megareweight command is not installed in this venv")
@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_megareweight_train_runs_from_any_directory(where, prepared_dir, tmp_path):
    cfg = {"model": {"size": "tiny"}, "loss": {"impl": "chunked"}, "wandb": {"mode": "disabled"},
           "data": {"prepared": str(prepared_dir), "seq_len": 16, "micro_batch_size": 2, "eval_sequences": 2},
           "train": {"max_steps": 2, "eval_interval": 0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([str(ENTRY_POINT), "train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"),
                          "--quiet"], cwd=ROOT if where == "repo_root" else tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_regular_install_carries_the_kernels_under_the_project_name(tmp_path):
    """``pip install .`` (a wheel, not a link to the checkout): the kernels are inside
    ``megareweight/`` and nothing else is installed at the top level."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheel"), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("megareweight-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"megareweight", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "megareweight/kernels/weighted_ce/function.py" in names and "megareweight/kernels/aot.py" in names
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                              str(tmp_path / "site"), str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    where = _python("import megareweight.kernels.weighted_ce as w; print(w.__file__)", tmp_path,
                    PYTHONPATH=str(tmp_path / "site"))
    assert Path(where).is_relative_to(tmp_path / "site")
