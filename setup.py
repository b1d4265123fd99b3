"""Build script: the Python package plus, when nvcc is found, the CUDA extension ``vitkern._C``.

The top-level folders ``triton_kernels/`` and ``bench/`` install as ``vitkern.triton_kernels`` and
``vitkern.bench`` (an unrelated PyPI package is called ``triton_kernels``).

``vitkern._C`` is built from ``csrc/`` by CMake + Ninja (see CMakeLists.txt); torch is never needed
at build time. Environment variables:

* ``VITKERN_CUDA``: ``1`` forces the extension (error if nvcc is missing), ``0`` skips it; unset:
  build it when nvcc is found (``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, ``PATH``, ``/usr/local/cuda/bin``).
* ``VITKERN_CUDA_ARCHS``: CUDA architectures, ``;`` or ``,`` separated (default ``80;90``; CMake syntax,
  so ``90a`` or ``80-real`` work; ``8.0`` and ``sm_80`` are accepted as ``80``).
* ``VITKERN_PTXAS_VERBOSE=1``: pass ``-Xptxas -v`` (registers and spills per kernel; ``pip install -v``
  shows them).
* ``CMAKE_BUILD_PARALLEL_LEVEL``: compile jobs (default: 2 at most).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
#: Import name -> folder of the three package roots; their subpackages (one folder per family,
#: e.g. vitkern.triton_kernels.ppma) are found below them, so a new folder needs no edit here.
ROOTS = {"vitkern": "vitkern", "vitkern.triton_kernels": "triton_kernels", "vitkern.bench": "bench"}


def find_packages_of(roots: dict) -> dict:
    """Every package (a folder with ``__init__.py``) under ``roots``, as import name -> folder."""
    packages = {}
    for name, folder in roots.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder).parts
            packages[".".join((name, *rel))] = "/".join((folder, *rel))
    return packages


PACKAGES = find_packages_of(ROOTS)
DEFAULT_CUDA_ARCHS = "80;90"


def _log(msg):
    print(f"vitkern setup: {msg}", file=sys.stderr, flush=True)


def find_nvcc():
    """Path of nvcc, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            cand = Path(root) / "bin" / "nvcc"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    found = shutil.which("nvcc")
    if found:
        return found
    cand = Path("/usr/local/cuda/bin/nvcc")
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    return None


def parse_cuda_archs(value):
    """'80;90' / '80,90' / '8.0 9.0' / 'sm_90a' -> '80;90' (CMake CUDA_ARCHITECTURES list)."""
    archs = []
    for tok in re.split(r"[;,\s]+", value.strip()):
        if not tok:
            continue
        tok = tok.lower()
        tok = tok[len("sm_"):] if tok.startswith("sm_") else tok
        m = re.fullmatch(r"(\d+)\.(\d)(.*)", tok)
        if m:
            tok = m.group(1) + m.group(2) + m.group(3)
        if not re.fullmatch(r"\d+[af]?(-real|-virtual)?", tok):
            raise ValueError(f"VITKERN_CUDA_ARCHS: cannot parse CUDA architecture {tok!r} in {value!r}")
        if tok not in archs:
            archs.append(tok)
    if not archs:
        raise ValueError(f"VITKERN_CUDA_ARCHS is empty ({value!r})")
    return ";".join(archs)


def _env_flag(name):
    """True / False for 1/0-like values, None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 0 or 1, got {os.environ[name]!r}")


class CMakeExtension(Extension):
    """An extension built by CMakeLists.txt rather than by setuptools' compiler."""

    def __init__(self, name):
        # depends: ships csrc/ and CMakeLists.txt in the sdist (setuptools adds project-internal
        # depends to it), so an sdist can build the extension too.
        depends = ["CMakeLists.txt"] + sorted(
            str(p.relative_to(ROOT)).replace(os.sep, "/")
            for p in (ROOT / "csrc").rglob("*")
            if p.is_file() and p.suffix in (".h", ".cuh", ".cu", ".cpp")
        )
        super().__init__(name, sources=[], depends=depends)


class CMakeBuild(build_ext):
    """Builds CMakeExtension with CMake + Ninja when nvcc is available (see module docstring)."""

    def run(self):
        want = _env_flag("VITKERN_CUDA")
        nvcc = find_nvcc() if want is not False else None
        if want is True and nvcc is None:
            raise RuntimeError(
                "VITKERN_CUDA=1 but nvcc was not found (looked in $CUDA_HOME/bin, $CUDA_PATH/bin, "
                "PATH and /usr/local/cuda/bin). Install the CUDA toolkit or set CUDA_HOME, or "
                "unset VITKERN_CUDA to install without the CUDA extension vitkern._C."
            )
        cmake_exts = [e for e in self.extensions if isinstance(e, CMakeExtension)]
        if cmake_exts and nvcc is None:
            why = "VITKERN_CUDA=0" if want is False else "nvcc not found"
            _log(f"skipping the CUDA extension vitkern._C ({why}); the Triton and reference "
                 "backends are unaffected. Reinstall with VITKERN_CUDA=1 to build it.")
            self.extensions = [e for e in self.extensions if e not in cmake_exts]
            self._remove_stale_inplace(cmake_exts)
        self._nvcc = nvcc
        super().run()

    def _remove_stale_inplace(self, exts):
        # An editable install keeps the module in the source folder; a skipped build must not
        # leave an old one there, or `import vitkern._C` would load a stale binary.
        if not (self.inplace or getattr(self, "editable_mode", False)):
            return
        build_py = self.get_finalized_command("build_py")
        for ext in exts:
            *pkg, name = ext.name.split(".")
            pkg_dir = Path(build_py.get_package_dir(".".join(pkg)))
            for stale in list(pkg_dir.glob(f"{name}.*.so")) + list(pkg_dir.glob(f"{name}.*.pyd")):
                _log(f"removing stale {stale}")
                stale.unlink()

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11  # in build-system.requires

        out_file = Path(self.get_ext_fullpath(ext.name)).resolve()
        out_dir = out_file.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "vitkern-cmake"

        archs = parse_cuda_archs(os.environ.get("VITKERN_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS)
        ptxas_verbose = bool(_env_flag("VITKERN_PTXAS_VERBOSE"))
        cmake = shutil.which("cmake")
        if cmake is None:
            try:
                import cmake as cmake_pkg  # the pip package

                cmake = os.path.join(cmake_pkg.CMAKE_BIN_DIR, "cmake")
            except ImportError as e:
                raise RuntimeError("CMake >= 3.18 is needed to build vitkern._C (pip install cmake)") from e

        suffix = out_file.name[len(ext.name.split(".")[-1]):]  # e.g. .cpython-311-x86_64-linux-gnu.so
        config = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DCMAKE_CUDA_COMPILER={self._nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DVITKERN_CUDA_ARCHS={archs}",
            f"-DVITKERN_PTXAS_VERBOSE={'ON' if ptxas_verbose else 'OFF'}",
            f"-DVITKERN_VERSION={self.distribution.get_version()}",
            f"-DVITKERN_OUTPUT_DIR={out_dir}",
            f"-DVITKERN_EXT_SUFFIX={suffix}",
        ]
        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as ninja_pkg

                ninja = os.path.join(ninja_pkg.BIN_DIR, "ninja")
            except ImportError:
                ninja = None
        if ninja is not None:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]

        # A build folder configured by other tools (pip's isolated build envs come and go) is
        # stale: its cache points at them. Start it afresh then; otherwise rebuild incrementally.
        stamp = build_dir / "vitkern-tools.txt"
        tools = "\n".join([cmake, str(ninja), self._nvcc, sys.executable, pybind11.get_cmake_dir()])
        if build_dir.exists() and (not stamp.exists() or stamp.read_text() != tools):
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(tools)

        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(min(2, os.cpu_count() or 1))
        _log(f"building vitkern._C with {self._nvcc} for CUDA archs {archs} ({jobs} jobs)")
        try:
            subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
            subprocess.run([cmake, "--build", str(build_dir), "--config", config, "--parallel", jobs],
                           check=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(
                f"building the CUDA extension vitkern._C failed ({e}); see the CMake/nvcc output "
                "above (pip install -v shows it). Set VITKERN_CUDA_ARCHS to architectures your nvcc "
                "supports, or VITKERN_CUDA=0 to install without vitkern._C."
            ) from e
        if not out_file.exists():
            raise RuntimeError(f"CMake finished but {out_file} was not produced")


setup(
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    # which CUDA C++ kernels backend="auto" may pick (vitkern/cuda_auto.py); read at dispatch
    package_data={"vitkern": ["cuda_auto.json"]},
    ext_modules=[CMakeExtension("vitkern._C")],
    cmdclass={"build_ext": CMakeBuild},
)
