"""Installation and self-report (issue 11): the just-in-time build of the native kernels (its
decision, cache, opt-out and failure handling, with torch's compiler call faked: a real build takes
a minute and is marked slow), the warning of backend='auto' with its fix, ``python -m
deepzero_kernels.info``, the OpenMP wait-policy default and the trainer's first line."""
import json
import os
import shutil
import subprocess
import sys
import types
import warnings

import pytest
import torch

import deepzero_kernels
from deepzero_kernels import info, kernels, ops, runtime, train

try:  # its home moved into kernels/ with the backend registry
    from deepzero_kernels.kernels import native_build as nb
except ImportError:  # pragma: no cover
    from deepzero_kernels import native_build as nb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = "deepzero_kernels._native"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private JIT cache and no opt-outs from the caller's environment."""
    for k in ("DZ_NO_JIT", "DZ_NO_NATIVE", "DZ_NATIVE_REQUIRED", "CXX"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DZ_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fresh_native():
    """Forget the native backend's first load (and the warnings given) before and after the test."""
    reset = getattr(kernels, "_reset_native", lambda: None)
    warned = getattr(getattr(kernels, "registry", None), "_warned", None)
    reset()
    saved = set(warned) if warned is not None else None
    if warned is not None:
        warned.clear()
    yield
    reset()
    if warned is not None:
        warned.clear()
        warned.update(saved)


def tools_present():
    return nb.find_compiler() is not None and nb.find_ninja() is not None and nb.csrc_dir() is not None


# ----------------------------------------------------------------------------- the JIT decision
def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DZ_CACHE_DIR", str(tmp_path / "c"))
    assert nb.cache_root() == str(tmp_path / "c")
    monkeypatch.delenv("DZ_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert nb.cache_root() == str(tmp_path / "x" / "deepzero_kernels")


@pytest.mark.parametrize("var", ["DZ_NO_JIT", "DZ_NO_NATIVE"])
def test_opt_outs(cache, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    ok, why = nb.jit_plan()
    assert not ok and var in why
    assert nb.load_jit() == (None, why)
    assert not cache.exists()  # nothing was built or written


def test_missing_tools_and_sources_are_named(cache, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    ok, why = nb.jit_plan()
    assert not ok and "compiler" in why and "CXX" in why
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(nb, "find_compiler", lambda: "/usr/bin/c++")
    monkeypatch.setattr(nb, "find_ninja", lambda: None)
    ok, why = nb.jit_plan()
    assert not ok and "pip install ninja" in why
    monkeypatch.setattr(nb, "csrc_dir", lambda: None)
    ok, why = nb.jit_plan()
    assert not ok and "csrc" in why


@pytest.mark.skipif(not tools_present(), reason="needs a C++ compiler, ninja and the csrc/ sources")
def test_plan_names_a_build_dir_per_sources_torch_and_python(cache, tmp_path, monkeypatch):
    ok, build_dir = nb.jit_plan()
    assert ok and build_dir.startswith(str(cache))
    name = os.path.basename(build_dir)
    assert f"cp{sys.version_info[0]}{sys.version_info[1]}" in name and "torch" in name
    # a change of any source gives another directory: a stale module is never loaded
    src = tmp_path / "csrc"
    shutil.copytree(nb.csrc_dir(), src)
    monkeypatch.setattr(nb, "csrc_dir", lambda: str(src))
    before = nb.jit_build_dir(str(src), torch.__version__, False)
    with open(src / "dz_math.h", "a") as f:
        f.write("\n// changed\n")
    assert nb.jit_build_dir(str(src), torch.__version__, False) != before
    assert nb.jit_build_dir(str(src), "9.9.9", False) != nb.jit_build_dir(str(src), torch.__version__, False)


# ----------------------------------------------------------------------------- build and reuse (faked)
def fake_toolchain(monkeypatch, tmp_path, load):
    """jit_plan's tools and headers present, and torch's compiler call replaced by ``load``."""
    if nb.csrc_dir() is None:
        pytest.skip("the csrc/ sources are not part of this installation")
    monkeypatch.setattr(nb, "find_compiler", lambda: "/usr/bin/c++")
    monkeypatch.setattr(nb, "find_ninja", lambda: "/usr/bin/ninja")
    inc = tmp_path / "include"
    inc.mkdir()
    (inc / "Python.h").write_text("")
    monkeypatch.setattr(nb.sysconfig, "get_paths", lambda *a, **k: {"include": str(inc)})
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setitem(sys.modules, NATIVE, None)  # so that undo restores what was there (or nothing)
    monkeypatch.delitem(sys.modules, NATIVE)


def test_first_use_builds_once_with_a_message_then_reuses_the_cache(cache, tmp_path, monkeypatch, capsys, fresh_native):
    calls = []
    so = tmp_path / "_native.so"
    so.write_bytes(b"")

    def load(**kw):
        calls.append(kw)
        assert kw["name"] == "_native" and kw["build_directory"].startswith(str(cache))
        assert "-fopenmp" in kw["extra_cflags"] and all(os.path.isfile(s) for s in kw["sources"])
        return types.SimpleNamespace(__file__=str(so), cpu_isa=lambda: "baseline")

    fake_toolchain(monkeypatch, tmp_path, load)
    mod, why = nb.load_jit()
    assert why is None and mod.cpu_isa() == "baseline" and len(calls) == 1
    assert sys.modules[NATIVE] is mod
    err = capsys.readouterr().err
    assert "building the native kernels" in err and "DZ_NO_JIT=1" in err and "done in" in err
    # a later process imports the cached module without calling the compiler
    ok, build_dir = nb.jit_plan()
    assert ok and nb.cached_module_path(build_dir) == str(so)
    monkeypatch.setattr(nb, "_import_built", lambda path: types.SimpleNamespace(__file__=path, cached=True))
    mod2, why2 = nb.load_jit()
    assert why2 is None and mod2.cached and len(calls) == 1
    assert capsys.readouterr().err == ""


def test_failed_build_falls_back_once_and_is_not_retried(cache, tmp_path, monkeypatch, capsys, fresh_native):
    calls = []

    def load(**kw):
        calls.append(kw)
        raise RuntimeError("Error building extension '_native': c++: fatal error")

    fake_toolchain(monkeypatch, tmp_path, load)
    mod, why = nb.load_jit()
    assert mod is None and "failed" in why and NATIVE not in sys.modules
    assert "failed after" in capsys.readouterr().err
    ok, why = nb.jit_plan()
    assert not ok and "failed before" in why and "FAILED.log" in why
    with open(why.split("log: ")[1].split(";")[0]) as f:
        assert "fatal error" in f.read()
    assert nb.load_jit()[0] is None and len(calls) == 1  # remembered: no minute lost per run


def test_failed_build_is_an_error_when_native_is_required(cache, tmp_path, monkeypatch, fresh_native):
    def load(**kw):
        raise RuntimeError("boom")

    fake_toolchain(monkeypatch, tmp_path, load)
    monkeypatch.setenv("DZ_NATIVE_REQUIRED", "1")
    with pytest.raises(RuntimeError, match="DZ_NATIVE_REQUIRED"):
        nb.load_jit()


# ----------------------------------------------------------------------------- what the user is told
def test_auto_warns_once_with_the_fix(cache, monkeypatch, fresh_native):
    monkeypatch.setitem(sys.modules, NATIVE, None)  # the install built no extension
    monkeypatch.setenv("DZ_NO_JIT", "1")
    with pytest.warns(UserWarning) as rec:
        assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    msg = str(rec[0].message)
    assert "torch backend" in msg and "DZ_NO_JIT" in msg
    assert "--no-build-isolation" in msg and "deepzero_kernels.info" in msg  # the fix
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"  # once
    with pytest.raises(ValueError, match="DZ_NO_JIT"):
        ops.resolve_backend("native", torch.device("cpu"))


def test_info_reports_every_section(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    for section in ("deepzero_kernels", "versions", "cpu", "cuda", "backends", "fused kernels", "threads",
                    "memory", "caches"):
        assert f"== {section}\n" in out, section
    for key in ("python", "torch", "triton", "numpy", "C++ compiler", "native kernels' instruction set",
                "native on cpu", "torch intra-op threads", "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "native JIT builds"):
        assert key in out, key
    assert all(k in out for k in kernels.KERNEL_NAMES)
    assert info.main(["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["versions"]["torch"].startswith(torch.__version__)
    assert rep["threads"]["torch intra-op threads"] == torch.get_num_threads()


def test_info_module_entry_point():
    env = dict(os.environ, DZ_NO_JIT="1")
    out = subprocess.run([sys.executable, "-m", "deepzero_kernels.info"], capture_output=True, text=True,
                         env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "== backends" in out.stdout and "== fused kernels" in out.stdout


def test_omp_wait_policy_default():
    code = "import deepzero_kernels, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "DZ_OMP_DEFAULTS")}

    def policy(env, code=code):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()[-1]

    assert policy(base) == "PASSIVE"                                   # set before torch loads
    assert policy(dict(base, OMP_WAIT_POLICY="active")) == "active"    # the user's choice stands
    assert policy(dict(base, DZ_OMP_DEFAULTS="0")) == "None"           # opt-out
    assert policy(base, "import torch; " + code) == "None"             # too late: torch came first


def test_rss_is_measured():
    if not sys.platform.startswith("linux"):
        pytest.skip("/proc is Linux")
    r = runtime.rss_bytes()
    assert r is not None and 10 << 20 < r < 1 << 40
    assert runtime.peak_rss_bytes() >= r // 2
    assert "torch threads" in runtime.thread_settings()


def test_trainer_first_line_says_backend_device_threads_and_budget(capsys):
    argv = ["--dataset", "synthetic", "--synthetic-shape", "1,8,8", "--synthetic-size", "32,16", "--model", "cnn",
            "--width", "4", "--depth", "1", "--batch-size", "16", "--grasp-q", "2", "--epochs", "1",
            "--no-progress", "--threads", "1", "--memory-budget", str(64 << 20)]
    assert train.main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("backend ") and "device cpu" in first and "1 torch threads" in first
    assert "memory budget 0.06 GiB per chunk (--memory-budget)" in first and "resident" in first


def test_package_version_matches_pyproject():
    path = os.path.join(ROOT, "pyproject.toml")
    if not os.path.isfile(path):
        pytest.skip("not a source checkout")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    with open(path, "rb") as f:
        meta = tomllib.load(f)
    assert meta["project"]["version"] == deepzero_kernels.__version__
    assert not any(r.startswith("torch") for r in meta["build-system"]["requires"])  # isolation never pulls torch


# ----------------------------------------------------------------------------- a real build (slow)
@pytest.mark.slow
@pytest.mark.skipif(not tools_present(), reason="needs a C++ compiler, ninja and the csrc/ sources")
def test_real_jit_build_into_a_fresh_cache(tmp_path):
    """The whole path in a fresh process: no prebuilt extension, first use builds (about a minute on
    2 cores), the kernels run, and a second process loads the cached module."""
    code = ("import sys; sys.modules['deepzero_kernels._native'] = None  # no prebuilt extension\n"
            "import deepzero_kernels.kernels as k\n"
            "ok, why = k.available('cpu')['native']; assert ok, why\n"
            "import deepzero_kernels._native as n; print('isa', n.cpu_isa())\n")
    env = dict(os.environ, DZ_CACHE_DIR=str(tmp_path))
    env.pop("DZ_NO_JIT", None)
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert first.returncode == 0, first.stderr
    assert "building the native kernels" in first.stderr and "done in" in first.stderr
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "building" not in second.stderr and "isa" in second.stdout
