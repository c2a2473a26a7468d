"""Static report of the statistics kernel, no GPU needed: what the compiled code will do.

For every variant the launcher launches (kernel x dtype x GradScaler scale or not x
16-byte-aligned or not, with the launcher's own tile sizes, warps and compiler options), it
compiles the kernel for NVIDIA targets with the installed Triton and reads the machine code.
The kernels are ``"histogram"`` (the full launch, ``histogram=True``), ``"light"`` (no
histogram: the first launch of ``histogram=False``) and ``"gated"`` (the full launch that
follows a light one; its fast loop is the histogram kernel's):

* ``registers`` per thread, ``spills`` (bytes of stack/local memory: 0 means none) and
  ``shared`` memory per program (``cuobjdump -res-usage``);
* from the SASS of the fast loop (the first loop whose global loads are unmasked and not
  L2-only: the careful path's and the finishing program's loads are masked, the latter
  also ``.cg``): instructions, barriers, warp shuffles and global loads per iteration, and
  per element; bytes of loads issued per thread per iteration (what one thread keeps in
  flight);
* programs per SM that the registers allow (65536 registers per SM, sm_90), and the bytes
  in flight per SM that gives;
* the finishing program's serial steps for a 262M-element tensor (a Llama embedding).

``python benchmarks/kernel_static.py [--arch 90,100] [--kernels light,histogram,gated]
[--jobs N] [--json PATH]`` prints a table and writes the report as a JSON list, one object
per variant (``kernel``, ``dtype``, ``arch``, ``scale``, ``aligned``, ``triton``, the readings
above). Run it under
another Triton (e.g. the GPU machine's 3.6, ``make`` sets one up in ``.venv-triton36``) by
pointing ``--python`` at that interpreter; each object records the Triton version it was
compiled with.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMBEDDING_NUMEL = 128256 * 2048  # Llama-3 embedding: 262.7M elements
REGISTERS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
KERNELS = ("light", "histogram", "gated")
"""The kernels a launch compiles: ``kernel_meta``'s (histogram, gated) of each."""
_KERNEL_FLAGS = {"light": (False, False), "histogram": (True, False), "gated": (True, True)}

# Run in a child process (so TRITON_INTERPRET can be unset and another Triton used); compiles
# every requested variant, one JSON line each.
_COMPILE = r"""
import json, sys, traceback
import numpy as np
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
requests = json.loads(sys.argv[1])
sys.path.append(requests[0]["root"])  # after any installed gradscope; a checkout maps gradscope.kernels itself
from gradscope.kernels import grad_stats as kernel, launch as k

fn = kernel._grad_stats_kernel
for request in requests:
    try:
        name, arch, scale, aligned = request["dtype"], request["arch"], request["scale"], request["aligned"]
        histogram, gated = request["flags"]
        torch_dtype = getattr(torch, name)
        block, careful, min_chunk, final_rows, warps = k._launch_sizes(torch_dtype)
        constants, options = k.kernel_meta(torch_dtype, aligned=aligned, scale=scale, histogram=histogram,
                                           gated=gated, block=block, careful_block=careful,
                                           final_rows=final_rows, num_warps=warps)
        rows, lanes, vec = constants["ROWS"], constants["LANES"], constants["VEC"]
        acc = "fp64" if name == "float64" else "fp32"
        signature = {"tables_ptr": "*i64", "partial_ptr": "*" + acc, "arrival_ptr": "*i32", "trigger_ptr": "*i32",
                     "out_ptr": "*fp64", "scale_ptr": "*fp32", "num_tensors": "i32"}
        signature.update({key: "constexpr" for key in constants})
        # Torch allocations are 16-byte aligned: the JIT marks every pointer argument so.
        attrs = {(fn.arg_names.index(p),): [["tt.divisibility", 16]] for p in signature
                 if signature[p].startswith("*")}
        source = ASTSource(fn=fn, signature=signature, attrs=attrs,
                           constexprs={(fn.arg_names.index(key),): value for key, value in constants.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        open(request["cubin"], "wb").write(compiled.asm["cubin"])
        chunk = int(k.chunk_sizes(np.array([request["embedding"]]), min_chunk)[0])
        chunks = -(-request["embedding"] // chunk)
        meta = {"triton": triton.__version__, "block": block, "careful_block": careful, "warps": warps,
                "tile": [rows, lanes, vec], "final_rows": final_rows,
                "embedding_chunk": chunk, "embedding_chunks": chunks,
                "final_steps_262m": -(-chunks // final_rows),
                "do_not_specialize": [fn.arg_names[p] if isinstance(p, int) else str(p)
                                      for p in getattr(fn, "do_not_specialize", [])]}
    except Exception:
        meta = {"error": traceback.format_exc().strip().splitlines()[-1]}
    print(json.dumps(meta), flush=True)
"""

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise SystemExit(f"no cuobjdump in this Triton ({path})")
    return str(path)


def instructions(sass: str) -> list[tuple[int, str, str, bool]]:
    """(address, opcode, operands, predicated) of every instruction in a SASS listing."""
    return [(int(m.group(1), 16), m.group(3), m.group(4), m.group(2) is not None) for m in _INSTRUCTION.finditer(sass)]


def _is_tile_load(opcode: str, predicated: bool) -> bool:
    """A global load of the fast loop: unmasked (not predicated) and cached as usual (the
    finishing program's ``.cg`` loads are ``.STRONG.GPU``)."""
    return opcode.startswith("LDG") and not predicated and ".STRONG" not in opcode


def fast_loop(code: list[tuple[int, str, str, bool]]) -> list[tuple[int, str, str, bool]]:
    """Instructions of the first loop (a backward branch's span) holding the fast path's
    unmasked tile loads (:func:`_is_tile_load`), i.e. the fast path's loop; empty if none.

    It holds the histogram's shared-memory atomics (or warp votes) where there is one; the
    careful path's loop and the finishing program's loads are masked."""
    for address, opcode, operands, _ in code:
        if opcode != "BRA":
            continue
        target = re.search(r"0x([0-9a-f]+)", operands)
        if target is None or int(target.group(1), 16) >= address:
            continue
        body = [ins for ins in code if int(target.group(1), 16) <= ins[0] <= address]
        if any(_is_tile_load(op, predicated) for _, op, _, predicated in body):
            return body
    return []


def load_bytes(opcode: str) -> int:
    """Bytes one thread reads with a global load opcode (LDG.E.128 -> 16)."""
    widths = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
    for suffix, size in widths.items():
        if f".{suffix}" in opcode:
            return size
    return 4


def variants(arches: list[int], kernels: tuple[str, ...] = KERNELS) -> list[dict]:
    """Every (kernel, dtype, scale, aligned) the launcher launches, for each architecture."""
    return [
        {"kernel": kernel, "dtype": dtype, "arch": arch, "scale": scale, "aligned": aligned}
        for arch in arches
        for kernel in kernels
        for dtype in ("bfloat16", "float16", "float32", "float64")
        for scale in (False, True)
        for aligned in (True, False)
    ]


def _cubin(variant: dict, workdir: Path, python: str) -> Path:
    tag = re.sub(r"[^A-Za-z0-9]+", "_", str(Path(python).parent.parent.name))
    v = variant
    return workdir / f"{tag}-{v['kernel']}-{v['dtype']}-{v['arch']}-{int(v['scale'])}-{int(v['aligned'])}.cubin"


def _compile(chosen: list[dict], python: str, workdir: Path) -> list[dict]:
    """Compile ``chosen`` in one child process of ``python``: each variant's meta or error."""
    requests = [
        dict(
            dtype=v["dtype"],
            arch=v["arch"],
            scale=v["scale"],
            aligned=v["aligned"],
            flags=_KERNEL_FLAGS[v["kernel"]],
            cubin=str(_cubin(v, workdir, python)),
            embedding=EMBEDDING_NUMEL,
            root=str(ROOT),
        )
        for v in chosen
    ]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [python, "-c", _COMPILE, json.dumps(requests)], capture_output=True, text=True, env=env, timeout=1800
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or len(lines) != len(chosen):
        error = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
        return [{"error": error}] * len(chosen)
    return [json.loads(line) for line in lines]


def read_cubin(variant: dict, meta: dict, cubin: Path) -> dict:
    """The report of one compiled variant (module docstring)."""
    tool = cuobjdump()
    usage = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(\w+):(\d+)", usage.split("_grad_stats_kernel", 1)[-1]))
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True).stdout
    loop = fast_loop(instructions(sass))
    opcodes = [op for _, op, _, _ in loop]
    threads = 32 * meta["warps"]
    elements = meta["block"] / threads  # per thread per fast-loop iteration
    loads = [op for op in opcodes if op.startswith("LDG")]
    barriers = sum(op.startswith("BAR") for op in opcodes)
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
        loop_barriers=barriers,
        loop_shuffles=sum(op.startswith("SHFL") for op in opcodes),
        loop_loads=len(loads),
        elements_per_thread=elements,
        instructions_per_element=len(loop) / elements if loop else None,
        barriers_per_element=barriers / elements if loop else None,
        load_bytes_per_thread=bytes_per_thread,
        programs_per_sm=programs,
        bytes_in_flight_per_sm=bytes_per_thread * threads * programs,
    )


def analyse_all(chosen: list[dict], python: str, workdir: Path, jobs: int = 2) -> list[dict]:
    """The report of every variant in ``chosen``, compiled by ``python``'s Triton in ``jobs``
    child processes (each imports torch and Triton once for its share)."""
    workdir.mkdir(parents=True, exist_ok=True)
    shares = [chosen[i::jobs] for i in range(max(1, jobs)) if chosen[i::jobs]]
    with ThreadPoolExecutor(len(shares) or 1) as pool:
        metas = list(pool.map(lambda share: _compile(share, python, workdir), shares))
    by_variant = {}
    for share, share_metas in zip(shares, metas, strict=True):
        for variant, meta in zip(share, share_metas, strict=True):
            key = json.dumps(variant, sort_keys=True)
            if "error" in meta:
                by_variant[key] = dict(variant, **meta)
            else:
                by_variant[key] = read_cubin(variant, meta, _cubin(variant, workdir, python))
    return [by_variant[json.dumps(v, sort_keys=True)] for v in chosen]


def print_report(report: list[dict]) -> None:
    head = (
        f"{'triton':<6} {'arch':>4} {'kernel':<9} {'dtype':<9} {'scale':>5} {'align':>5} {'regs':>4} {'spill':>5} "
        f"{'smem':>5} {'ins/el':>6} {'bar/el':>6} {'shfl':>4} {'LDG B/thr':>9} {'prog/SM':>7} {'KB/SM':>6} "
        f"{'final steps':>11}"
    )
    print(head)
    for r in report:
        lead = f"{r.get('triton', '?'):<6} {r['arch']:>4} {r['kernel']:<9} {r['dtype']:<9} {r['scale']!s:>5} "
        if "error" in r:
            print(f"{lead}{r['aligned']!s:>5}  ERROR {r['error'][:80]}")
            continue
        ipe = f"{r['instructions_per_element']:.1f}" if r["instructions_per_element"] else "-"
        bpe = f"{r['barriers_per_element']:.2f}" if r["barriers_per_element"] is not None else "-"
        print(
            f"{lead}{r['aligned']!s:>5} {r['registers']:>4} {r['spills']:>5} {r['shared']:>5} {ipe:>6} {bpe:>6} "
            f"{r['loop_shuffles']:>4} {r['load_bytes_per_thread']:>9} {r['programs_per_sm']:>7} "
            f"{r['bytes_in_flight_per_sm'] / 1024:>6.1f} {r['final_steps_262m']:>11}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="comma-separated compute capabilities (90, 100)")
    parser.add_argument("--json", default=None, help="write the report (a JSON list) here")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose Triton compiles")
    parser.add_argument("--dtypes", default=None, help="comma-separated subset of dtypes")
    parser.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {KERNELS}")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiling processes")
    args = parser.parse_args(argv)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "gradscope-kernel-static"
    chosen = variants([int(a) for a in args.arch.split(",")], tuple(args.kernels.split(",")))
    if args.dtypes:
        chosen = [v for v in chosen if v["dtype"] in args.dtypes.split(",")]
    report = analyse_all(chosen, args.python, work, jobs=args.jobs)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if any("error" in r for r in report) else 0


if __name__ == "__main__":
    sys.exit(main())
