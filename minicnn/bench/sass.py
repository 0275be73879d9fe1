"""What the machine code of the CUDA kernels says, without a GPU: registers, spills, shared
memory and, for each kernel with FMAs, the instructions per FFMA of its innermost loop.

    python -m minicnn.bench sass [--arch sm_90 sm_80] [--files conv2d ...] [--rev REV] [--json]

Each kernels/*.cu is compiled to a cubin with nvcc (ptxas's resource report gives registers,
spill bytes and static shared memory), disassembled with cuobjdump -sass, and each kernel's
innermost loop found: the smallest span from a backward branch's target to the branch that holds
FFMAs. Its instruction count over its FFMA count is the issue cost of one FMA in the steady state
(1.0 is the floor: nothing but FMAs). It is a static count: both sides of a branch inside the
loop are counted, so it is an upper bound for the path a warp takes. "calls" counts subroutine
calls: 64-bit integer division is one, so index maths in 64 bits shows there. --rev measures the sources as committed at a git revision (e.g. to compare with HEAD).

Needs nvcc (the CUDA toolkit) and cuobjdump (the toolkit, or pip install
nvidia-cuda-cuobjdump); no GPU.
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from minicnn.cuda import kernels
from minicnn.errors import UsageError

CONV_KERNELS = ("conv2d_forward", "conv2d_backward_data", "conv2d_backward_weight")
NVCC_OPTIONS = ("-std=c++17", "--resource-usage")            # NVRTC's dialect, as RawModule
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


@dataclass
class Instruction:
    address: int
    opcode: str          # the mnemonic with its modifiers, e.g. "FFMA", "LDS.128", "BRA"
    text: str            # the whole instruction, predicate included


# ---- parsing cuobjdump's text -----------------------------------------------------------------
def parse_sass(text):
    """cuobjdump -sass output -> {kernel name: [Instruction, ...]} in address order."""
    functions, current = {}, None
    for line in text.splitlines():
        name = re.match(r"\s*Function\s*:\s*(\S+)", line)
        if name:
            current = functions.setdefault(name.group(1), [])
            continue
        match = _SASS_LINE.search(line)
        if match and current is not None:
            body = match.group(2).strip()
            words = body.split()
            if words and words[0].startswith("@"):                 # a predicate: @P0, @!PT
                words = words[1:]
            if words:
                current.append(Instruction(int(match.group(1), 16), words[0], body))
    return functions


def branch_target(instruction, opcode="BRA"):
    """The address a BRA (or opcode, e.g. CALL) jumps to, or None for any other instruction."""
    if instruction.opcode.split(".")[0] != opcode:
        return None
    match = re.search(r"0x([0-9a-f]+)", instruction.text.split(opcode, 1)[1])
    return int(match.group(1), 16) if match else None


def subroutine_calls(instructions):
    """How many CALLs jump into a subroutine: code that ends in RET (as 64-bit integer division
    does). sm_80 code also uses CALL to leave a loop or reconverge a warp, jumping to code that
    ends in EXIT or comes back by BRA; those are not counted."""
    by_address = {ins.address: i for i, ins in enumerate(instructions)}
    count = 0
    for ins in instructions:
        target = branch_target(ins, "CALL")
        for following in instructions[by_address.get(target, len(instructions)):]:
            if following.opcode.startswith(("RET", "EXIT")):
                count += following.opcode.startswith("RET")
                break
    return count


def is_ffma(instruction):
    return instruction.opcode.split(".")[0] == "FFMA"


def inner_loop(instructions):
    """The innermost loop that holds FFMAs: (instructions, FFMAs) of the smallest span
    [branch target, backward branch] with an FFMA in it; None when no loop has one. NOPs (padding)
    are not counted."""
    best = None
    for i, ins in enumerate(instructions):
        target = branch_target(ins)
        if target is None or target > ins.address:
            continue
        body = [x for x in instructions[:i + 1] if x.address >= target and x.opcode != "NOP"]
        ffma = sum(map(is_ffma, body))
        if ffma and (best is None or len(body) < best[0]):
            best = (len(body), ffma)
    return best


def parse_resource_usage(text):
    """nvcc --resource-usage (ptxas -v) output -> {kernel: {registers, spill_bytes, shared_bytes}};
    spill_bytes counts spill stores plus spill loads."""
    usage, current = {}, None
    for line in text.splitlines():
        name = re.search(r"Function properties for (\S+)", line)
        if name:
            current = usage.setdefault(name.group(1), {"registers": 0, "spill_bytes": 0,
                                                       "shared_bytes": 0})
            continue
        if current is None:
            continue
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills:
            current["spill_bytes"] = int(spills.group(1)) + int(spills.group(2))
        registers = re.search(r"Used (\d+) registers", line)
        if registers:
            current["registers"] = int(registers.group(1))
            shared = re.search(r"(\d+) bytes smem", line)
            current["shared_bytes"] = int(shared.group(1)) if shared else 0
    return usage


# ---- running the tools ------------------------------------------------------------------------
def find_tool(name):
    """The path of CUDA tool name: on PATH, in a CUDA toolkit folder, or in the NVIDIA pip
    wheels (nvidia-cuda-cuobjdump puts it in site-packages/nvidia/cu*/bin); None if absent."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/local/cuda*/bin/{name}"))
    try:
        import nvidia                                             # the pip wheels' namespace
        for folder in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(folder, "*", "bin", name)))
    except ImportError:
        pass
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def _tools():
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        missing = " and ".join(n for n, p in [("nvcc", nvcc), ("cuobjdump", cuobjdump)] if p is None)
        raise UsageError(f"python -m minicnn.bench sass needs {missing}: install the CUDA toolkit "
                         f"(nvcc) and pip install nvidia-cuda-cuobjdump.")
    return nvcc, cuobjdump


def _run(command):
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no message"]
        raise UsageError(f"{Path(command[0]).name} failed on {Path(command[-1]).name}: {lines[-1]}")
    return result.stdout + result.stderr


def sources(rev=None, stems=None):
    """{file stem: CUDA source} of kernels/<stem>.cu (default: every file): the working tree, or
    git revision rev."""
    stems = sorted(set(kernels.KERNEL_FILES.values())) if stems is None else stems
    if rev is None:
        return {stem: kernels.kernel_source(stem) for stem in stems}
    texts = {}
    for stem in stems:
        if shutil.which("git") is None:
            raise UsageError("--rev needs git, and a git checkout of minicnn.")
        result = subprocess.run(["git", "show", f"{rev}:kernels/{stem}.cu"], capture_output=True,
                                text=True, cwd=kernels.source_dir())
        if result.returncode != 0:
            raise UsageError(f"git cannot show kernels/{stem}.cu at {rev!r}: "
                             f"{result.stderr.strip()}")
        texts[stem] = result.stdout
    return texts


def measure(arch="sm_90", rev=None, stems=None):
    """One row per kernel: {kernel, file, arch, registers, spill_bytes, shared_bytes, calls,
    loop_instructions, loop_ffma, instr_per_ffma} (the loop fields None without FFMAs); calls
    counts subroutine calls, e.g. to the one that does 64-bit integer division."""
    nvcc, cuobjdump = _tools()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for stem, text in sources(rev, stems).items():
            source, cubin = Path(folder) / f"{stem}.cu", Path(folder) / f"{stem}.{arch}.cubin"
            source.write_text(text)
            usage = parse_resource_usage(_run([nvcc, "-cubin", f"-arch={arch}", *NVCC_OPTIONS,
                                               "-o", str(cubin), str(source)]))
            functions = parse_sass(_run([cuobjdump, "-sass", str(cubin)]))
            for name in sorted(functions):
                loop = inner_loop(functions[name])
                calls = subroutine_calls(functions[name])
                rows.append({"kernel": name, "file": f"{stem}.cu", "arch": arch, **usage[name],
                             "calls": calls,
                             "loop_instructions": loop[0] if loop else None,
                             "loop_ffma": loop[1] if loop else None,
                             "instr_per_ffma": round(loop[0] / loop[1], 2) if loop else None})
    return rows


def format_table(rows):
    """The rows as a fixed-width table, one line per kernel and architecture."""
    header = (f"{'kernel':<26}{'arch':<7}{'regs':>5}{'spill B':>8}{'smem B':>8}{'calls':>6}"
              f"{'loop instr':>11}{'FFMA':>6}{'instr/FFMA':>11}")
    lines = [header, "-" * len(header)]
    for r in rows:
        loop = (f"{r['loop_instructions']:>11}{r['loop_ffma']:>6}{r['instr_per_ffma']:>11.2f}"
                if r["loop_ffma"] else f"{'-':>11}{'-':>6}{'-':>11}")
        lines.append(f"{r['kernel']:<26}{r['arch']:<7}{r['registers']:>5}{r['spill_bytes']:>8}"
                     f"{r['shared_bytes']:>8}{r['calls']:>6}{loop}")
    return "\n".join(lines)


def _arch(text):
    if not re.fullmatch(r"sm_\d{2,3}a?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an architecture like sm_90")
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minicnn.bench sass",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", type=_arch, default=["sm_90", "sm_80"],
                        help="GPU architectures to compile for (default sm_90 sm_80)")
    parser.add_argument("--files", nargs="+", choices=sorted(set(kernels.KERNEL_FILES.values())),
                        default=None, help="only these kernels/*.cu files (default: all)")
    parser.add_argument("--rev", default=None,
                        help="measure kernels/*.cu as committed at this git revision")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)                 # a bad --arch: argparse's one line, status 2
    try:
        rows = [row for arch in args.arch for row in measure(arch, args.rev, args.files)]
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
