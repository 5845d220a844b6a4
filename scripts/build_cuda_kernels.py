"""Build the authors' CUDA kernels (causal-conv1d, mamba-ssm) as wheels, for one GPU architecture.

Both setup scripts first try to download a prebuilt wheel (which fails on a machine without
network) and then compile for every architecture their nvcc knows (nine on CUDA 13), which
multiplies the build time. This script builds from the source distributions in ``--sdists``:
the download is switched off (each package's FORCE_BUILD variable), the build runs against
the installed torch (``--no-build-isolation``), and the setup script's list of ``-gencode``
targets is cut to ``--arch``; their ``-std=c++17`` becomes ``c++20`` where the installed
torch's headers require it (torch 2.14 does). Both packages compile at once, sharing
``--jobs``.

Wheels already in ``--wheels`` for the same package and version are kept, not rebuilt, so a
second run installs in seconds:

    python scripts/build_cuda_kernels.py --sdists .cuda_src --wheels .cuda_wheels --arch 9.0
    pip install --no-deps --no-index .cuda_wheels/*.whl

Get the source distributions with (on a machine with the package index; torch installed):

    MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE pip download --no-deps \
        --no-binary :all: --no-build-isolation -d .cuda_src mamba-ssm causal-conv1d
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

# Package name -> the environment variable that skips its prebuilt-wheel download.
FORCE_BUILD = {"causal-conv1d": "CAUSAL_CONV1D_FORCE_BUILD", "mamba-ssm": "MAMBA_FORCE_BUILD"}
# Share of --jobs per package: mamba-ssm has 10 translation units, causal-conv1d 3.
JOB_SHARE = {"causal-conv1d": 0.3, "mamba-ssm": 0.7}

_GENCODE_PAIR = re.compile(
    r'^(?P<indent>[ \t]*)cc_flag\.append\("-gencode"\)\n'
    r'[ \t]*cc_flag\.append\("arch=compute_(?P<arch>\d+a?),code=sm_\d+a?"\)\n', re.MULTILINE)


class BuildError(RuntimeError):
    pass


def arch_code(arch: str) -> str:
    """'9.0' -> '90', '9.0a' -> '90a' (TORCH_CUDA_ARCH_LIST spelling to nvcc's)."""
    match = re.fullmatch(r"(\d+)\.(\d)(a?)", arch.strip())
    if not match:
        raise BuildError(f"--arch: '{arch}' is not a compute capability like 9.0")
    return match.group(1) + match.group(2) + match.group(3)


def restrict_gencodes(setup_py: str, arch: str) -> Tuple[str, int]:
    """Drop every ``-gencode`` pair of a setup script except the one for ``arch``.

    Returns the new text and how many pairs were dropped (each becomes a ``pass``, so an ``if``
    whose body was only such pairs stays valid). The setup scripts build their nvcc
    flags as ``cc_flag.append("-gencode")`` followed by ``cc_flag.append("arch=compute_XX,
    code=sm_XX")``; a script without a pair for ``arch`` is an error, since the kernels would
    then not run on that GPU.
    """
    code = arch_code(arch)
    kept, dropped = [], 0

    def keep_or_drop(match: "re.Match[str]") -> str:
        nonlocal dropped
        if match.group("arch") == code:
            kept.append(code)
            return match.group(0)
        dropped += 1
        return f"{match.group('indent')}pass  # sm_{match.group('arch')} left out\n"

    text = _GENCODE_PAIR.sub(keep_or_drop, setup_py)
    if not kept:
        raise BuildError(f"setup.py has no -gencode entry for sm_{code}; "
                         "its flag list changed, so this script needs updating")
    return text, dropped


def find_cuda_home(env: Dict[str, str]) -> str:
    """The CUDA toolkit to build with: $CUDA_HOME or $CUDA_PATH if set, else the first of
    (the folder above the folder of ``nvcc`` on the PATH, /usr/local/cuda) that holds both
    bin/nvcc and include/cuda_runtime_api.h. torch takes the folder above ``nvcc`` unchecked,
    which fails when ``nvcc`` on the PATH is a wrapper script outside the toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            return env[var]
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    candidates = [os.path.dirname(os.path.dirname(nvcc))] if nvcc else []
    for home in candidates + ["/usr/local/cuda"]:
        if os.path.isfile(os.path.join(home, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    raise BuildError("no CUDA toolkit found (nvcc and cuda_runtime_api.h); set CUDA_HOME")


def required_cxx_standard() -> Optional[str]:
    """'c++20' when the installed torch's headers refuse anything older (recent releases say
    so in ATen.h), else None: the setup scripts ask for C++17, and such a build then fails."""
    import torch.utils.cpp_extension as cpp
    for include in cpp.include_paths():
        header = os.path.join(include, "ATen", "ATen.h")
        if os.path.isfile(header):
            with open(header) as f:
                return "c++20" if "C++20 or later" in f.read() else None
    return None


def set_cxx_standard(setup_py: str, standard: Optional[str]) -> str:
    """Every ``-std=c++NN`` of a setup script replaced by ``standard`` (None: unchanged)."""
    return setup_py if standard is None else re.sub(r"-std=c\+\+\d+", f"-std={standard}",
                                                    setup_py)


def sdist_version(path: str) -> Tuple[str, str]:
    """('mamba-ssm', '2.3.2.post1') from .../mamba_ssm-2.3.2.post1.tar.gz."""
    match = re.fullmatch(r"(.+?)-(\d[^-]*)\.tar\.gz", os.path.basename(path))
    if not match:
        raise BuildError(f"{path}: not a source distribution named NAME-VERSION.tar.gz")
    return match.group(1).replace("_", "-").lower(), match.group(2)


def find_sdists(folder: str) -> Dict[str, Tuple[str, str]]:
    """Package -> (sdist path, version) for the packages this script builds."""
    found: Dict[str, Tuple[str, str]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.tar.gz"))):
        name, version = sdist_version(path)
        if name in FORCE_BUILD:
            if name in found:
                raise BuildError(f"{folder}: two source distributions of {name} "
                                 f"({os.path.basename(found[name][0])}, "
                                 f"{os.path.basename(path)}); keep one")
            found[name] = (path, version)
    missing = sorted(set(FORCE_BUILD) - set(found))
    if missing:
        raise BuildError(f"{folder}: no source distribution of {', '.join(missing)}")
    return found


def cached_wheel(folder: str, name: str, version: str) -> Optional[str]:
    pattern = os.path.join(folder, f"{name.replace('-', '_')}-{version}-*.whl")
    matches = sorted(glob.glob(pattern))
    return matches[0] if matches else None


def _unpack(sdist: str, into: str) -> str:
    with tarfile.open(sdist) as tar:
        tar.extractall(into, filter="data")
    (root,) = [d for d in os.listdir(into) if os.path.isdir(os.path.join(into, d))]
    return os.path.join(into, root)


def start_build(name: str, sdist: str, arch: str, jobs: int, wheels: str, log_path: str,
                workdir: str, cxx_standard: Optional[str]) -> subprocess.Popen:
    src = _unpack(sdist, workdir)
    setup_py = os.path.join(src, "setup.py")
    with open(setup_py) as f:
        text, dropped = restrict_gencodes(f.read(), arch)
    text = set_cxx_standard(text, cxx_standard)
    with open(setup_py, "w") as f:
        f.write(text)
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(jobs),
               **{FORCE_BUILD[name]: "TRUE"})
    env["CUDA_HOME"] = find_cuda_home(env)
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
           "--no-index", "-w", wheels, src]
    log = open(log_path, "w")
    log.write(f"{name}: dropped {dropped} -gencode targets, kept sm_{arch_code(arch)}; "
              f"MAX_JOBS={jobs}; CUDA_HOME={env['CUDA_HOME']}; "
              f"C++ standard: {cxx_standard or 'as the setup script says'}\n"
              f"$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def build(sdists: str, wheels: str, arch: str, jobs: int, logs: str) -> List[str]:
    """Build what is not cached; return one summary line per package. Raises on failure."""
    os.makedirs(wheels, exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    lines, running = [], {}
    cxx_standard = required_cxx_standard()
    with tempfile.TemporaryDirectory() as workdir:
        for name, (sdist, version) in find_sdists(sdists).items():
            hit = cached_wheel(wheels, name, version)
            if hit:
                lines.append(f"{name} {version}: cached {os.path.basename(hit)}")
                continue
            share = max(1, round(jobs * JOB_SHARE[name]))
            os.makedirs(os.path.join(workdir, name))
            log_path = os.path.join(logs, f"build_{name}.log")
            running[name] = (version, log_path, time.time(),
                             start_build(name, sdist, arch, share, wheels, log_path,
                                         os.path.join(workdir, name), cxx_standard))
        failed = []
        for name, (version, log_path, start, proc) in running.items():
            rc = proc.wait()
            took = time.time() - start
            hit = cached_wheel(wheels, name, version)
            if rc or not hit:
                failed.append(f"{name} {version}: build failed (exit {rc}) after {took:.0f} s, "
                              f"see {log_path}")
            else:
                lines.append(f"{name} {version}: built {os.path.basename(hit)} in {took:.0f} s "
                             f"({os.path.getsize(hit) / 2**20:.1f} MiB)")
    if failed:
        raise BuildError("; ".join(lines + failed))
    return lines


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sdists", required=True,
                        help="folder holding causal_conv1d-*.tar.gz and mamba_ssm-*.tar.gz")
    parser.add_argument("--wheels", required=True,
                        help="folder for the wheels; wheels already there are reused")
    parser.add_argument("--arch", default="9.0", help="compute capability to build for [9.0]")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 4,
                        help="parallel compile jobs over both packages [all cores]")
    parser.add_argument("--logs", default=None, help="folder for build logs [--wheels]")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if not os.path.isdir(args.sdists):
        parser.error(f"--sdists: no folder {args.sdists}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        arch_code(args.arch)
        for line in build(args.sdists, args.wheels, args.arch, args.jobs,
                          args.logs or args.wheels):
            print(line)
    except BuildError as err:
        print(f"build_cuda_kernels: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
