"""Static report of the statistics kernel, no GPU needed: what the compiled code will do.

For every variant the launcher launches (dtype x GradScaler scale or not x 16-byte-aligned
or not, with the launcher's own tile sizes, warps and compiler options), it compiles the
kernel for NVIDIA targets with the installed Triton and reads the machine code:

* ``registers`` per thread, ``spills`` (bytes of stack/local memory: 0 means none) and
  ``shared`` memory per program (``cuobjdump -res-usage``);
* from the SASS of the fast loop (the first loop holding the histogram's shared-memory
  atomics): instructions, barriers and global loads per iteration, and per element;
  bytes of loads issued per thread per iteration (what one thread keeps in flight);
* programs per SM that the registers allow (65536 registers per SM, sm_90), and the bytes
  in flight per SM that gives;
* the finishing program's serial steps for a 262M-element tensor (a Llama embedding).

``python benchmarks/kernel_static.py [--arch 90,100] [--json PATH]`` prints a table and
writes the report as a JSON list, one object per variant. Run it under another Triton
(e.g. the GPU machine's 3.6) by pointing ``--python`` at that interpreter; the report
records the Triton version it was compiled with.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMBEDDING_NUMEL = 128256 * 2048  # Llama-3 embedding: 262.7M elements
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048

# Run in a child process (so TRITON_INTERPRET can be unset and another Triton used).
_COMPILE = r"""
import json, sys
import numpy as np
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
request = json.loads(sys.argv[1])
sys.path.append(request["root"])  # after any installed gradscope; a checkout maps gradscope.kernels itself
from gradscope.kernels import grad_stats as kernel, launch as k

name, arch, scale, aligned = request["dtype"], request["arch"], request["scale"], request["aligned"]
torch_dtype = getattr(torch, name)
block, careful, min_chunk, final_rows, warps = k._launch_sizes(torch_dtype)
constants, options = k.kernel_meta(torch_dtype, aligned=aligned, scale=scale, block=block, careful_block=careful,
                                   final_rows=final_rows, num_warps=warps)
rows, lanes, vec = constants["ROWS"], constants["LANES"], constants["VEC"]
fn = kernel._grad_stats_kernel
acc = "fp64" if name == "float64" else "fp32"
signature = {"tables_ptr": "*i64", "partial_ptr": "*" + acc, "arrival_ptr": "*i32", "out_ptr": "*fp64",
             "scale_ptr": "*fp32", "num_tensors": "i32"}
signature.update({key: "constexpr" for key in constants})
# Torch allocations are 16-byte aligned: the JIT marks every pointer argument so.
attrs = {(fn.arg_names.index(p),): [["tt.divisibility", 16]] for p in signature if signature[p].startswith("*")}
source = ASTSource(fn=fn, signature=signature, attrs=attrs,
                   constexprs={(fn.arg_names.index(key),): value for key, value in constants.items()})
compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
open(request["cubin"], "wb").write(compiled.asm["cubin"])
chunk = int(k.chunk_sizes(np.array([request["embedding"]]), min_chunk)[0])
chunks = -(-request["embedding"] // chunk)
print(json.dumps({"triton": triton.__version__, "block": block, "careful_block": careful, "warps": warps,
                  "tile": [rows, lanes, vec], "final_rows": final_rows,
                  "embedding_chunk": chunk, "embedding_chunks": chunks,
                  "final_steps_262m": -(-chunks // final_rows),
                  "do_not_specialize": [fn.arg_names[p] if isinstance(p, int) else str(p)
                                        for p in getattr(fn, "do_not_specialize", [])]}))
"""

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise SystemExit(f"no cuobjdump in this Triton ({path})")
    return str(path)


def instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every instruction in a SASS listing."""
    return [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _INSTRUCTION.finditer(sass)]


def fast_loop(code: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """Instructions of the first loop (a backward branch's span) that holds a shared-memory
    atomic (the histogram), i.e. the fast path's loop; empty if none."""
    for address, opcode, operands in code:
        if opcode != "BRA":
            continue
        target = re.search(r"0x([0-9a-f]+)", operands)
        if target is None or int(target.group(1), 16) >= address:
            continue
        body = [ins for ins in code if int(target.group(1), 16) <= ins[0] <= address]
        if any(op.startswith("ATOMS") for _, op, _ in body):
            return body
    return []


def load_bytes(opcode: str) -> int:
    """Bytes one thread reads with a global load opcode (LDG.E.128 -> 16)."""
    widths = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
    for suffix, size in widths.items():
        if f".{suffix}" in opcode:
            return size
    return 4


def analyse(variant: dict, python: str, workdir: Path) -> dict:
    cubin = workdir / f"{variant['dtype']}-{variant['arch']}-{int(variant['scale'])}-{int(variant['aligned'])}.cubin"
    request = dict(variant, cubin=str(cubin), embedding=EMBEDDING_NUMEL, root=str(ROOT))
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [python, "-c", _COMPILE, json.dumps(request)], capture_output=True, text=True, env=env, timeout=600
    )
    if done.returncode != 0:
        return dict(variant, error=done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
    meta = json.loads(done.stdout.strip().splitlines()[-1])
    tool = cuobjdump()
    usage = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(\w+):(\d+)", usage.split("_grad_stats_kernel", 1)[-1]))
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True).stdout
    loop = fast_loop(instructions(sass))
    threads = 32 * meta["warps"]
    elements = meta["block"] / threads  # per thread per fast-loop iteration
    loads = [op for _, op, _ in loop if op.startswith("LDG")]
    registers = int(fields.get("REG", 0))
    by_registers = REGISTERS_PER_SM // max(1, registers * threads)
    programs = min(by_registers, MAX_THREADS_PER_SM // threads)
    bytes_per_thread = sum(load_bytes(op) for op in loads)
    return dict(
        variant,
        **meta,
        registers=registers,
        spills=int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)),
        shared=int(fields.get("SHARED", 0)),
        loop_instructions=len(loop),
        loop_barriers=sum(op.startswith("BAR") for _, op, _ in loop),
        loop_loads=len(loads),
        elements_per_thread=elements,
        instructions_per_element=len(loop) / elements if loop else None,
        barriers_per_element=sum(op.startswith("BAR") for _, op, _ in loop) / elements if loop else None,
        load_bytes_per_thread=bytes_per_thread,
        programs_per_sm=programs,
        bytes_in_flight_per_sm=bytes_per_thread * threads * programs,
    )


def variants(arches: list[int]) -> list[dict]:
    return [
        {"dtype": dtype, "arch": arch, "scale": scale, "aligned": aligned}
        for arch in arches
        for dtype in ("bfloat16", "float16", "float32", "float64")
        for scale in (False, True)
        for aligned in (True, False)
    ]


def print_report(report: list[dict]) -> None:
    head = (
        f"{'arch':>4} {'dtype':<9} {'scale':>5} {'align':>5} {'regs':>4} {'spill':>5} {'smem':>5} "
        f"{'ins/el':>6} {'bar/el':>6} {'LDG B/thr':>9} {'prog/SM':>7} {'KB/SM':>6} {'final steps':>11}"
    )
    print(head)
    for r in report:
        if "error" in r:
            print(f"{r['arch']:>4} {r['dtype']:<9} {r['scale']!s:>5} {r['aligned']!s:>5}  ERROR {r['error'][:80]}")
            continue
        ipe = f"{r['instructions_per_element']:.1f}" if r["instructions_per_element"] else "-"
        bpe = f"{r['barriers_per_element']:.2f}" if r["barriers_per_element"] is not None else "-"
        print(
            f"{r['arch']:>4} {r['dtype']:<9} {r['scale']!s:>5} {r['aligned']!s:>5} {r['registers']:>4} "
            f"{r['spills']:>5} {r['shared']:>5} {ipe:>6} {bpe:>6} {r['load_bytes_per_thread']:>9} "
            f"{r['programs_per_sm']:>7} {r['bytes_in_flight_per_sm'] / 1024:>6.1f} {r['final_steps_262m']:>11}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="comma-separated compute capabilities (90, 100)")
    parser.add_argument("--json", default=None, help="write the report (a JSON list) here")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose Triton compiles")
    parser.add_argument("--dtypes", default=None, help="comma-separated subset of dtypes")
    args = parser.parse_args(argv)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "gradscope-kernel-static"
    work.mkdir(parents=True, exist_ok=True)
    chosen = variants([int(a) for a in args.arch.split(",")])
    if args.dtypes:
        chosen = [v for v in chosen if v["dtype"] in args.dtypes.split(",")]
    report = [analyse(v, args.python, work) for v in chosen]
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in report) else 0


if __name__ == "__main__":
    sys.exit(main())
