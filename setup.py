"""Builds flash_attn and its CUDA extension flash_attn_2_cuda.

    pip install -r requirements.txt && pip install --no-build-isolation .

Build knobs (environment variables):
    FLASH_ATTN_HEADDIMS     kernel head dims to compile, e.g. "128" or "64,128" (default: all of
                            32,64,96,128,192,256)
    FLASH_ATTN_DTYPES       "fp16", "bf16" or "fp16,bf16" (default)
    FLASH_ATTN_CUDA_ARCHS   CUDA architectures, e.g. "90" or "80;90" (default "80;90")
    CUTLASS_DIR             a CUTLASS checkout or include folder (default: the nvidia-cutlass package)
    MAX_JOBS                parallel compile jobs (read by torch's BuildExtension)
"""
import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc" / "flash_attn"
ALL_HEADDIMS = [32, 64, 96, 128, 192, 256]
ALL_DTYPES = ["fp16", "bf16"]
# Kernel head dims with a Hopper (sm_90a) forward / backward, as in csrc/flash_attn/src/generate_kernels.py.
# The forward covers every kernel head dim but 32 (whose 64-byte rows would need a 32- or 64-byte
# swizzle and a smaller tile for little gain); so does the backward (docs/SM90_BACKWARD.md).
SM90_FWD_HEADDIMS = [64, 96, 128, 192, 256]
SM90_BWD_HEADDIMS = [64, 96, 128, 192, 256]
CUTLASS_PIN = "nvidia-cutlass==4.2.0.0"


def read_version() -> str:
    text = (ROOT / "flash_attn" / "__init__.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def env_list(name, default, cast=str):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return list(default)
    return [cast(x) for x in re.split(r"[;,\s]+", raw) if x]


def cutlass_include_dir() -> Path:
    """CUTLASS_DIR if set, else the headers shipped in the nvidia-cutlass wheel."""
    override = os.environ.get("CUTLASS_DIR")
    if override:
        for candidate in (Path(override) / "include", Path(override)):
            if (candidate / "cute" / "tensor.hpp").exists():
                return candidate
        sys.exit(f"CUTLASS_DIR={override} has no include/cute/tensor.hpp")
    try:
        import cutlass_library
    except ImportError:
        sys.exit(f"CUTLASS headers not found: pip install {CUTLASS_PIN} (or set CUTLASS_DIR)")
    include = Path(cutlass_library.__file__).resolve().parent / "source" / "include"
    if not (include / "cute" / "tensor.hpp").exists():
        sys.exit(f"{include} has no cute/tensor.hpp; reinstall {CUTLASS_PIN} or set CUTLASS_DIR")
    return include


def gencode(arch: str) -> str:
    # sm_90 code is built for sm_90a, the only compute capability 9.0 target with wgmma and
    # setmaxnreg (the Hopper kernels); the SM80 kernels compile to the same code under either.
    if arch == "90":
        return "-gencode=arch=compute_90a,code=sm_90a"
    return f"-gencode=arch=compute_{arch},code=sm_{arch}"


def extension_modules():
    try:
        from torch.utils.cpp_extension import CUDAExtension
    except ImportError:
        sys.exit("torch must be installed before building flash_attn (pip install --no-build-isolation .)")

    headdims = env_list("FLASH_ATTN_HEADDIMS", ALL_HEADDIMS, int)
    dtypes = env_list("FLASH_ATTN_DTYPES", ALL_DTYPES)
    archs = env_list("FLASH_ATTN_CUDA_ARCHS", ["80", "90"])
    bad = [h for h in headdims if h not in ALL_HEADDIMS] + [d for d in dtypes if d not in ALL_DTYPES]
    if bad:
        sys.exit(f"unknown FLASH_ATTN_HEADDIMS/FLASH_ATTN_DTYPES entries {bad}; choose from {ALL_HEADDIMS} / {ALL_DTYPES}")

    kernel_dir = CSRC / "src" / "instantiations"
    kernels = [kernel_dir / f"flash_fwd_hdim{h}_{d}.cu" for h in headdims for d in dtypes]
    kernels += [kernel_dir / f"flash_bwd_hdim{h}_{d}.cu" for h in headdims for d in dtypes]
    # The Hopper kernels (wgmma, TMA, setmaxnreg) need sm_90a.
    if "90" in archs:
        kernels += [
            kernel_dir / f"flash_fwd_sm90_hdim{h}_{d}.cu" for h in headdims if h in SM90_FWD_HEADDIMS for d in dtypes
        ]
        kernels += [
            kernel_dir / f"flash_bwd_sm90_hdim{h}_{d}.cu" for h in headdims if h in SM90_BWD_HEADDIMS for d in dtypes
        ]
    missing = [k for k in kernels if not k.exists()]
    if missing:
        sys.exit(f"missing {missing}; run csrc/flash_attn/src/generate_kernels.py")
    api = CSRC / "api"
    sources = sorted(api.glob("*.cpp")) + [CSRC / "src" / "kernels" / "kvcache_append.cu"] + kernels
    print(f"flash_attn: head dims {headdims}, dtypes {dtypes}, archs {archs}", flush=True)

    arch_list = ",".join(archs)
    cxx_flags = ["-O3", "-std=c++20", f"-DFLASH_ATTN_ARCHS_LIST={arch_list}"]
    nvcc_flags = [
        "-O3",
        "-std=c++20",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        # torch disables half operators for its own kernels; CUTLASS needs them.
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-DNDEBUG",
    ] + [gencode(a) for a in archs]
    # PTX of the lowest architecture too, so GPUs newer than every listed one JIT-compile it.
    # FLASH_ATTN_PTX=0 leaves it out for a build that only runs on the listed GPUs: the PTX is a
    # second compilation of every kernel (an SM80 kernel file: 103 s with it, 57 s without, on one
    # core of the development machine, 2026-12-07).
    ptx = os.environ.get("FLASH_ATTN_PTX", "1").strip()
    if ptx not in ("0", "1"):
        sys.exit(f"FLASH_ATTN_PTX must be 0 or 1, got {ptx!r}")
    if ptx == "1":
        lowest = min(archs, key=int)
        nvcc_flags += [f"-gencode=arch=compute_{lowest},code=compute_{lowest}"]
    return [
        CUDAExtension(
            name="flash_attn_2_cuda",
            sources=[str(s.relative_to(ROOT)) for s in sources],
            include_dirs=[str(CSRC), str(CSRC / "src"), str(cutlass_include_dir())],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    ]


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="flash_attn",
        version=read_version(),
        description="FlashAttention-2 compatible attention for PyTorch with split-KV decoding for every head layout",
        license="BSD-3-Clause",
        packages=find_packages(include=["flash_attn", "flash_attn.*"]),
        ext_modules=extension_modules(),
        cmdclass={"build_ext": BuildExtension},
        python_requires=">=3.9",
        install_requires=["torch", "einops"],
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
