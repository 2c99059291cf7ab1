"""Builds mixres._C: the C++ (CPU) kernels always, the CUDA kernels when they can be built.

Environment:
  FORCE_CUDA=1            build the CUDA kernels even without a GPU (needs nvcc); FORCE_CUDA=0 never builds them.
  CUDA_HOME               the CUDA toolkit (must hold bin/nvcc and include/cuda_runtime.h).
  TORCH_CUDA_ARCH_LIST    GPU architectures; default DEFAULT_ARCH_LIST below.
  MAX_JOBS                parallel compile jobs (ninja).
  MIXRES_DEBUG=1          -O0 -g.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

# Portable by default: Turing to Hopper as machine code, plus PTX that newer GPUs compile at load time.
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"
ROOT = os.path.dirname(os.path.abspath(__file__))


def log(message):
    print(f"mixres setup: {message}", file=sys.stderr)


def _has_cuda_headers(home):
    return home is not None and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))


def _locate_cuda_home():
    """CUDA_HOME if set, else the toolkit of the nvcc on PATH, else /usr/local/cuda.

    An nvcc on PATH can be a wrapper script outside its toolkit (torch would then guess a wrong CUDA_HOME), so a
    candidate counts only if it holds the CUDA headers."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    return next((home for home in candidates if _has_cuda_headers(home)), None)


def _want_cuda(torch_cuda, cuda_home):
    force = os.environ.get("FORCE_CUDA")
    if force == "0":
        log("FORCE_CUDA=0: building the CPU kernels only")
        return False
    usable = cuda_home is not None and _has_cuda_headers(cuda_home) and \
        os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if force == "1":
        if not usable:
            sys.exit(f"mixres setup: FORCE_CUDA=1 but no CUDA toolkit with bin/nvcc and include/cuda_runtime.h "
                     f"was found (CUDA_HOME={cuda_home!r}); set CUDA_HOME")
        return True
    if torch_cuda is None:
        log("torch is a CPU build: building the CPU kernels only")
        return False
    if not usable:
        log("torch is a CUDA build but no CUDA toolkit was found (set CUDA_HOME): building the CPU kernels only")
        return False
    return True


def _extension():
    cuda_home = _locate_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    debug = os.environ.get("MIXRES_DEBUG") == "1"
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    link_flags = []
    if torch.backends.openmp.is_available() and sys.platform != "darwin":
        # at::parallel_for is an OpenMP loop in torch's headers: without -fopenmp it compiles to a serial loop.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if _want_cuda(torch.version.cuda, cuda_home):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        # The pip wheels of CUDA libraries carry headers (cuBLAS, ...) that a bare toolkit may lack.
        wheel_includes = [os.path.join(p, "cu13", "include") for p in _nvidia_paths()]
        extra = [d for d in wheel_includes if os.path.isdir(d)]
        if extra:
            os.environ["CPATH"] = os.pathsep.join(filter(None, [os.environ.get("CPATH")] + extra))
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        log(f"building CPU and CUDA kernels with {cuda_home}/bin/nvcc for TORCH_CUDA_ARCH_LIST="
            f"{os.environ['TORCH_CUDA_ARCH_LIST']!r}: {', '.join(sources)}")
        return CUDAExtension(
            "mixres._C", sources,
            define_macros=[("MIXRES_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": (["-O0", "-g", "-G"] if debug else ["-O3"]) +
                                ["--expt-relaxed-constexpr", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    log(f"building CPU kernels: {', '.join(sources)}")
    return CppExtension("mixres._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


def _nvidia_paths():
    try:
        import nvidia
    except ImportError:
        return []
    return list(getattr(nvidia, "__path__", []))


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(no_python_abi_suffix=True)


setup(ext_modules=[_extension()], cmdclass={"build_ext": _build_ext()})
