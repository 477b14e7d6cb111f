"""Find the real CUDA toolkit folder (used by setup.py and scripts/check_build.sh).

Run as a script it prints the folder, or nothing when there is no toolkit."""
import glob
import os
import shutil


def find_cuda_home():
    """The real toolkit folder. `nvcc` on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc
    that execs /usr/local/cuda-13.0/bin/nvcc); torch would then guess /usr/local, and linking
    fails with `-lcudart not found`. Prefer a folder that really holds cuda_runtime.h."""

    def is_toolkit(path):
        return path and os.path.exists(os.path.join(path, "include", "cuda_runtime.h"))

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if is_toolkit(guess):
            return guess
        with open(nvcc, "rb") as f:  # a wrapper script: look for the toolkit path it execs
            head = f.read(4096).decode("latin-1")
        for token in head.split():
            if token.endswith("/bin/nvcc") and is_toolkit(os.path.dirname(os.path.dirname(token))):
                return os.path.dirname(os.path.dirname(token))
    for guess in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if is_toolkit(guess):
            return guess
    return None


if __name__ == "__main__":
    print(find_cuda_home() or "")
