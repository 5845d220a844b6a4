"""scripts/build_cuda_kernels.py without a GPU: the -gencode trimming of a setup script, the
source-distribution lookup, the wheel cache, failure reporting and the command line."""
import os
import subprocess
import sys
import tarfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))
import build_cuda_kernels as bck  # noqa: E402

# The shape of both packages' setup scripts: pairs of appends, some alone inside an `if`.
SETUP_PY = '''\
cc_flag = []
if True:
    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_75,code=sm_75")
    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_80,code=sm_80")
    if bare_metal_version >= 11.8:
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_90,code=sm_90")
    if bare_metal_version >= 12.8:
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_100,code=sm_100")
    other = ["-O3"]
extra_compile_args = {"cxx": ["-O3", "-std=c++17"], "nvcc": ["-std=c++17", "-O3"]}
'''


def run_setup(text: str, version: float = 13.0) -> list:
    scope = {"bare_metal_version": version}
    exec(compile(text, "setup.py", "exec"), scope)
    return scope["cc_flag"]


def test_only_the_requested_architecture_is_left():
    assert run_setup(SETUP_PY) == ["-gencode", "arch=compute_75,code=sm_75", "-gencode",
                                   "arch=compute_80,code=sm_80", "-gencode",
                                   "arch=compute_90,code=sm_90", "-gencode",
                                   "arch=compute_100,code=sm_100"]
    text, dropped = bck.restrict_gencodes(SETUP_PY, "9.0")
    assert dropped == 3
    # Still valid Python (the `if` that held only sm_100 keeps a body), and only sm_90 left.
    assert run_setup(text) == ["-gencode", "arch=compute_90,code=sm_90"]
    assert "other = [\"-O3\"]" in text


def test_cxx_standard_follows_the_installed_torch(tmp_path, monkeypatch):
    assert bck.set_cxx_standard(SETUP_PY, None) == SETUP_PY
    assert SETUP_PY.count("-std=c++17") == 2
    raised = bck.set_cxx_standard(SETUP_PY, "c++20")
    assert raised.count("-std=c++20") == 2 and "c++17" not in raised
    # torch's own ATen.h decides (first include folder that has one).
    import torch.utils.cpp_extension as cpp
    (tmp_path / "new" / "ATen").mkdir(parents=True)
    (tmp_path / "new" / "ATen" / "ATen.h").write_text(
        "#if __cplusplus < 202002L\n#error C++20 or later compatible compiler is required\n")
    (tmp_path / "old" / "ATen").mkdir(parents=True)
    (tmp_path / "old" / "ATen" / "ATen.h").write_text(
        "#if __cplusplus < 201703L\n#error C++17 or later compatible compiler is required\n")
    for folders, want in ((["empty", "new"], "c++20"), (["old", "new"], None), (["empty"], None)):
        monkeypatch.setattr(cpp, "include_paths", lambda *a, f=folders: [str(tmp_path / d)
                                                                       for d in f])
        assert bck.required_cxx_standard() == want


def test_a_setup_script_without_the_architecture_is_an_error():
    with pytest.raises(bck.BuildError, match="no -gencode entry for sm_86"):
        bck.restrict_gencodes(SETUP_PY, "8.6")


@pytest.mark.parametrize("arch, code", [("9.0", "90"), ("8.6", "86"), ("9.0a", "90a"),
                                        ("10.0", "100")])
def test_arch_code(arch, code):
    assert bck.arch_code(arch) == code


@pytest.mark.parametrize("arch", ["90", "sm_90", "9", ""])
def test_bad_arch_is_named(arch):
    with pytest.raises(bck.BuildError, match="not a compute capability"):
        bck.arch_code(arch)


def make_sdist(folder, name: str, version: str, setup_py: str = SETUP_PY) -> str:
    root = f"{name.replace('-', '_')}-{version}"
    src = folder / "src" / root
    src.mkdir(parents=True)
    (src / "setup.py").write_text(setup_py)
    path = folder / f"{root}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=root)
    return str(path)


def test_find_sdists_names_missing_and_duplicate_packages(tmp_path):
    conv = make_sdist(tmp_path, "causal-conv1d", "1.7.0")
    with pytest.raises(bck.BuildError, match="no source distribution of mamba-ssm"):
        bck.find_sdists(str(tmp_path))
    mamba = make_sdist(tmp_path, "mamba-ssm", "2.3.2.post1")
    assert bck.find_sdists(str(tmp_path)) == {"causal-conv1d": (conv, "1.7.0"),
                                              "mamba-ssm": (mamba, "2.3.2.post1")}
    (tmp_path / "mamba_ssm-2.2.6.tar.gz").write_bytes(b"")
    with pytest.raises(bck.BuildError, match="two source distributions of mamba-ssm"):
        bck.find_sdists(str(tmp_path))


def test_cached_wheels_are_reused_without_building(tmp_path, monkeypatch):
    make_sdist(tmp_path, "causal-conv1d", "1.7.0")
    make_sdist(tmp_path, "mamba-ssm", "2.3.2.post1")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("causal_conv1d-1.7.0-cp312-cp312-linux_x86_64.whl",
                 "mamba_ssm-2.3.2.post1-cp312-cp312-linux_x86_64.whl"):
        (wheels / name).write_bytes(b"wheel")
    # Another version of a package in the cache is not a hit.
    (wheels / "mamba_ssm-2.2.6-cp312-cp312-linux_x86_64.whl").write_bytes(b"old")

    def no_build(*args, **kwargs):
        raise AssertionError("a cached package was built again")

    monkeypatch.setattr(bck, "start_build", no_build)
    lines = bck.build(str(tmp_path), str(wheels), "9.0", 4, str(tmp_path))
    assert lines == ["causal-conv1d 1.7.0: cached causal_conv1d-1.7.0-cp312-cp312-linux_x86_64.whl",
                     "mamba-ssm 2.3.2.post1: cached "
                     "mamba_ssm-2.3.2.post1-cp312-cp312-linux_x86_64.whl"]


def test_build_runs_pip_on_the_trimmed_source_with_the_force_switch(tmp_path, monkeypatch):
    make_sdist(tmp_path, "causal-conv1d", "1.7.0")
    make_sdist(tmp_path, "mamba-ssm", "2.3.2.post1")
    wheels = tmp_path / "wheels"
    seen, real_popen = {}, subprocess.Popen

    def fake_popen(cmd, env, stdout, stderr):
        """Check what pip would get, then 'build' a wheel (or fail for mamba-ssm)."""
        src = cmd[-1]
        name = "mamba-ssm" if "mamba_ssm" in src else "causal-conv1d"
        seen[name] = dict(cmd=cmd, env={k: env[k] for k in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS",
                                                             "CUDA_HOME")},
                          force=env.get(bck.FORCE_BUILD[name]),
                          setup=open(os.path.join(src, "setup.py")).read())
        if name == "mamba-ssm":
            return real_popen([sys.executable, "-c", "raise SystemExit(3)"])
        (wheels / "causal_conv1d-1.7.0-cp312-cp312-linux_x86_64.whl").write_bytes(b"x")
        return real_popen([sys.executable, "-c", "pass"])

    monkeypatch.setattr(bck.subprocess, "Popen", fake_popen)
    monkeypatch.setattr(bck, "find_cuda_home", lambda env: "/opt/cuda-x")
    monkeypatch.setattr(bck, "required_cxx_standard", lambda: "c++20")
    with pytest.raises(bck.BuildError) as err:
        bck.build(str(tmp_path), str(wheels), "9.0", 10, str(tmp_path))
    message = str(err.value)
    assert "causal-conv1d 1.7.0: built causal_conv1d-1.7.0" in message
    assert "mamba-ssm 2.3.2.post1: build failed (exit 3)" in message
    for name, jobs in (("causal-conv1d", "3"), ("mamba-ssm", "7")):
        assert seen[name]["force"] == "TRUE"
        assert seen[name]["env"] == {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": jobs,
                                     "CUDA_HOME": "/opt/cuda-x"}
        assert {"--no-build-isolation", "--no-deps", "--no-index"} <= set(seen[name]["cmd"])
        assert run_setup(seen[name]["setup"]) == ["-gencode", "arch=compute_90,code=sm_90"]
        scope = {"bare_metal_version": 13.0}
        exec(seen[name]["setup"], scope)
        assert scope["extra_compile_args"] == {"cxx": ["-O3", "-std=c++20"],
                                               "nvcc": ["-std=c++20", "-O3"]}
    assert "dropped 3 -gencode targets" in (tmp_path / "build_mamba-ssm.log").read_text()


def make_toolkit(root, headers: bool = True):
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime_api.h").write_text("")
    return root


def test_cuda_home_skips_an_nvcc_wrapper_outside_the_toolkit(tmp_path, monkeypatch):
    wrapper = make_toolkit(tmp_path / "usr_local", headers=False)   # like /usr/local/bin/nvcc
    toolkit = make_toolkit(tmp_path / "cuda-13.0")
    real_isfile = os.path.isfile
    monkeypatch.setattr(bck.os.path, "isfile", lambda p: real_isfile(
        str(p).replace("/usr/local/cuda/", f"{toolkit}/")))
    assert bck.find_cuda_home({"PATH": str(wrapper / "bin")}) == "/usr/local/cuda"
    assert bck.find_cuda_home({"PATH": str(toolkit / "bin")}) == str(toolkit)
    assert bck.find_cuda_home({"PATH": "", "CUDA_HOME": "/x"}) == "/x"
    monkeypatch.setattr(bck.os.path, "isfile", lambda p: False)
    with pytest.raises(bck.BuildError, match="no CUDA toolkit found"):
        bck.find_cuda_home({"PATH": str(wrapper / "bin")})


@pytest.mark.parametrize("argv, message", [
    (["--sdists", "/no/such/folder", "--wheels", "w"], "--sdists: no folder /no/such/folder"),
    (["--sdists", ".", "--wheels", "w", "--jobs", "0"], "--jobs must be at least 1"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bck.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_sources_exit_1_naming_them(tmp_path, capsys):
    assert bck.main(["--sdists", str(tmp_path), "--wheels", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no source distribution of causal-conv1d, mamba-ssm" in err
