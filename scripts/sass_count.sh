#!/usr/bin/env bash
# SASS instruction counts of one kernel instantiation file, compiled for sm_90 on a machine without
# a GPU: per kernel, and the decode kernels' main loop (the backward branch whose body holds the
# most MMA instructions: the loop over key blocks). Shows whether a refactor changes the code the
# decode loop runs.
#   bash scripts/sass_count.sh [csrc/flash_attn/src/instantiations/flash_fwd_hdim128_fp16.cu]
# Uses nvcc (CUDA_HOME or PATH), the CUTLASS headers setup.py uses (CUTLASS_DIR or the
# nvidia-cutlass package) and the cuobjdump shipped in triton's package. SASS_KEEP=DIR keeps the
# cubin and the disassembly there.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-csrc/flash_attn/src/instantiations/flash_fwd_hdim128_fp16.cu}
nvcc=${CUDA_HOME:+$CUDA_HOME/bin/}nvcc
cutlass=${CUTLASS_DIR:-$(python3 -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source"))')}
[ -d "$cutlass/include" ] && cutlass=$cutlass/include
cuobjdump=$(python3 -c 'import triton, os; print(os.path.dirname(triton.__file__))')/backends/nvidia/bin/cuobjdump
work=${SASS_KEEP:-$(mktemp -d)}
mkdir -p "$work"
cubin=$work/$(basename "$src" .cu).cubin
# The nvcc flags of setup.py, for sm_90 only.
"$nvcc" -cubin -O3 -std=c++20 --use_fast_math --expt-relaxed-constexpr --expt-extended-lambda \
  -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_HALF2_OPERATORS__ \
  -U__CUDA_NO_BFLOAT16_CONVERSIONS__ -DNDEBUG -gencode=arch=compute_90,code=sm_90 \
  -I csrc/flash_attn/src -I "$cutlass" -o "$cubin" "$src"
"$cuobjdump" -sass "$cubin" >"$work/sass.txt"
python3 - "$work/sass.txt" <<'EOF'
import re, subprocess, sys

kernels, name = {}, None
for line in open(sys.argv[1]):
    m = re.match(r"\s+Function : (\S+)", line)
    if m:
        name = m.group(1)
        kernels[name] = []
        continue
    m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
    if name and m:
        kernels[name].append((int(m.group(1), 16), m.group(2)))
names = list(kernels)
demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
print(f"{'instructions':>12}  {'main loop':>9}  kernel (NOP padding not counted)")
for mangled, pretty in sorted(zip(names, demangled), key=lambda x: x[1]):
    ins = kernels[mangled]
    # Backward branches: "BRA 0x..." to a lower address. The key loop is the one whose body holds the
    # most MMA instructions (the longest loop can be the epilogue's, after them); its length counts.
    targets = [(addr, int(re.findall(r"0x([0-9a-f]+)", op)[-1], 16)) for addr, op in ins
               if re.search(r"\bBRA\b", op) and "0x" in op]
    mma = [addr for addr, op in ins if re.search(r"\bH(G)?MMA\b", op)]
    loops = [(sum(target <= a <= addr for a in mma), -(addr - target), (addr - target) // 16 + 1)
             for addr, target in targets if target < addr]
    loop = max(loops, default=(0, 0, 0))[2]
    short = re.sub(r"cute::|cutlass::|flash::", "", pretty)
    print(f"{sum(not op.startswith('NOP') for _, op in ins):12d}  {loop if 'decode' in pretty.lower() else '':>9}  {short[:150]}")
EOF
[ -n "${SASS_KEEP:-}" ] || rm -rf "$work"
