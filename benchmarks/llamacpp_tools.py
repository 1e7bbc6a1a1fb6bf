"""llama.cpp's command-line `llama-quantize`, built from the llama-cpp-python 0.3.36 sdist on PyPI (the same
llama.cpp the `llamacpp` extra binds), for the benchmarks that need what its Python API cannot pass: an importance
matrix (`--imatrix`). Nothing of llama.cpp is committed; the sdist and the build live in the cache.

    python benchmarks/llamacpp_tools.py   # prints ~/.cache/compress/bench/llamacpp/build/bin/llama-quantize

First run: download (77 MB) and a CMake build of the quantize tool only (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGE = "llama-cpp-python==0.3.36"
ROOT = Path("~/.cache/compress/bench/llamacpp").expanduser()


def llama_quantize() -> Path:
    """The path of the built llama-quantize binary (built on first use)."""
    binary = ROOT / "build" / "bin" / "llama-quantize"
    if binary.is_file():
        return binary
    ROOT.mkdir(parents=True, exist_ok=True)
    sdists = sorted(ROOT.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "--no-binary", ":all:", "-q",
                        "-d", str(ROOT)], check=True)
        sdists = sorted(ROOT.glob("llama_cpp_python-*.tar.gz"))
    src = ROOT / sdists[0].name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if not src.is_dir():
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(ROOT, filter="data")
    subprocess.run(["cmake", "-S", str(src), "-B", str(ROOT / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON"], check=True)
    subprocess.run(["cmake", "--build", str(ROOT / "build"), "--target", "llama-quantize", "-j", "2"], check=True)
    return binary


if __name__ == "__main__":
    print(llama_quantize())
