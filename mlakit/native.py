"""mlakit's C kernels (``mlakit/csrc/*.c``): built for this CPU on first use, cached, called via ctypes.

Three kernels, one library:

* ``paged_decode.c``: decode attention over the paged cache (the ``cpu`` attention backend,
  :mod:`mlakit.attention.backends.cpu`);
* ``int8_gemv.c``: int8 weight x int8 activation products for a few rows with AVX512-VNNI
  (:class:`mlakit.quant.Int8Linear` at decode);
* ``decode_step.c``: every layer of a decode step (absorbed MLA or GQA) in one call, built on the
  two above (the engine's fused CPU decode, :mod:`mlakit.engine.cpu_step`).

The library is compiled with the system C compiler for *this* CPU (``-O3 -march=native
-ffast-math -fopenmp``: AVX2, AVX-512, BF16 and VNNI as the machine has them) into
``$MLAKIT_CACHE/kernels/<hash>/``, keyed by the sources, the compiler command and the CPU's flags,
so a copied cache directory never runs code built for another CPU. The build takes a few
seconds; it is written under a temporary name and renamed, so an interrupted build leaves
nothing behind. OpenMP resolves to the libgomp PyTorch has already loaded (same soname), so the
kernels and PyTorch share one thread pool. Calls release the GIL.

:func:`load_native` returns ``None``, with the reason logged once, when there is no compiler or
the build fails; callers then use their PyTorch paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import torch

from mlakit.io import cache_dir, write_file
from mlakit.paged import PagedRows

logger = logging.getLogger(__name__)

SOURCES = tuple(sorted((Path(__file__).parent / "csrc").glob("*.c")))
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c11")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
INT8_GEMV_MAX_ROWS = 16  # MAX_ROWS in int8_gemv.c

_i, _i64, _p = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
# paged_decode: shapes; q, k, v, scales; dtype, strides; tables; lengths, row lengths; block, splits, threads, out
_PAGED_DECODE: list[Any] = [
    *(_i, _i, _i, _i, _i),
    *(_p, _p, _p, _p, _p),
    *(_i, _i64, _i64, _i64),
    *(_p, _i64),
    *(_p, _p),
    *(_i, _i, _i, _p),
]
_INT8_GEMV: list[Any] = [_i, _i, _i, _i, _p, _p, _p, _p, _p, _i, _i]


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc.split()[0]):
            return cc.split()[0]
    return None


class NativeKernels:
    """The loaded library (see the C sources for each contract)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        self._paged_decode = lib.mlakit_paged_decode
        self._paged_decode.argtypes = _PAGED_DECODE
        self._paged_decode.restype = ctypes.c_int
        self._int8_gemv = lib.mlakit_int8_gemv
        self._int8_gemv.argtypes = _INT8_GEMV
        self._int8_gemv.restype = ctypes.c_int
        self.has_int8_gemv = bool(lib.mlakit_int8_gemv_available())
        # argtypes are set by mlakit.engine.cpu_step, which owns the structures it takes
        self.decode_step = lib.mlakit_decode_step
        self.decode_step.restype = ctypes.c_int

    def paged_decode(
        self,
        q: torch.Tensor,
        k_rows: PagedRows,
        v_rows: PagedRows,
        tables: torch.Tensor,
        context_lens: torch.Tensor,
        max_context: int,
        block_size: int,
        dv: int,
        group_stride: int,
        row_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q [B, G, nq, dk]`` (pre-scaled) over paged rows -> fp32 ``[B, G, nq, dv]``.

        ``tables [B, M]`` may repeat one row (a stride-0 expand: the query blocks of one prefill
        chunk, each with its own ``context_lens``). ``k_rows is v_rows`` with ``group_stride == 0``
        is the MLA latent case (values are the first ``dv`` columns of the key row); otherwise group
        ``g`` reads columns ``g * group_stride ..`` of the K and V rows. ``row_lens [B, G, nq]``
        (optional, each ``<= context_lens[b]``) limits query row ``h`` to positions ``< row_lens``:
        the rows of one sequence may then be several tokens' heads, each at its causal edge.
        """
        b, g, nq, dk = q.shape
        q = q.to(torch.float32).contiguous()
        tables = tables.to(torch.int64)
        if tables.stride(-1) != 1:  # rows may repeat (stride 0: many queries of one sequence), not columns
            tables = tables.contiguous()
        lens = context_lens.to(torch.int64).contiguous()
        out = torch.empty(b, g, nq, dv, dtype=torch.float32)
        if row_lens is not None:
            row_lens = row_lens.to(torch.int64).expand(b, g, nq).contiguous()
        threads = torch.get_num_threads()
        splits = max(1, min(math.ceil(max_context / 512), math.ceil(2 * threads / max(b * g, 1))))
        k, v = k_rows.data, v_rows.data
        rc = self._paged_decode(
            b, g, nq, dk, dv, q.data_ptr(), k.data_ptr(), v.data_ptr(),
            0 if k_rows.scale is None else k_rows.scale.data_ptr(),
            0 if v_rows.scale is None else v_rows.scale.data_ptr(),
            DTYPE_CODES[k.dtype], k.stride(0), v.stride(0), group_stride,
            tables.data_ptr(), tables.stride(0), lens.data_ptr(), 0 if row_lens is None else row_lens.data_ptr(),
            block_size, splits, threads, out.data_ptr(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("the paged decode kernel could not allocate its work buffers")
        return out

    def int8_gemv(
        self, x: torch.Tensor, w_u8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, k: int, n_out: int
    ) -> torch.Tensor:
        """``x [M, K]`` (M <= 16, fp32 or bf16) times int8 weights stored +128 as ``w_u8`` -> ``[M, N]``.

        ``w_u8`` is ``[ceil(N / 16), Kp / 64, 16, 64]``: tiles of 16 rows, 64 bytes of each row
        after another (:func:`mlakit.quant.pack_int8_tiles`); ``N = n_out``.

        The result has ``x``'s dtype; ``w_scale`` and ``bias`` are fp32.
        """
        m = x.shape[0]
        n, kp = n_out, w_u8.shape[1] * 64
        bf16 = x.dtype == torch.bfloat16
        if not bf16:
            x = x.to(torch.float32)
        x = x.contiguous()
        y = torch.empty(m, n, dtype=x.dtype)
        rc = self._int8_gemv(
            m, n, k, kp, x.data_ptr(), w_u8.data_ptr(), w_scale.data_ptr(),
            0 if bias is None else bias.data_ptr(), y.data_ptr(), int(bf16), torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"int8_gemv failed (code {rc}) for x {tuple(x.shape)}, w {tuple(w_u8.shape)}")
        return y


def _build(target: Path, cc: str, flags: tuple[str, ...] = FLAGS) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)

    def compile_to(tmp: Path) -> None:
        cmd = [cc, *flags, *map(str, SOURCES), "-o", str(tmp), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")

    write_file(target, compile_to)


def build_kernels(target: Path, march: str) -> NativeKernels | None:
    """Build the kernels for ``-march=<march>`` (not this CPU's) at ``target`` and load them.

    For tests of the code other CPUs run: ``haswell`` gives the AVX2-only build (no AVX-512, no
    VNNI, no BF16 instructions) that runs on this machine too. ``None`` without a compiler.

    Raises: OSError when the build fails.
    """
    cc = _compiler()
    if cc is None:
        return None
    _build(target, cc, tuple(f"-march={march}" if f == "-march=native" else f for f in FLAGS))
    return NativeKernels(target)


@functools.lru_cache(maxsize=1)  # build and load once per process
def load_native() -> NativeKernels | None:
    """The kernels for this CPU, built if needed; ``None`` (reason logged once) when they cannot be built."""
    cc = _compiler()
    if cc is None:
        logger.warning("no C compiler found: mlakit's CPU kernels are off, PyTorch paths run instead")
        return None
    digest = hashlib.sha256()
    for src in SOURCES:
        digest.update(src.read_bytes())
    digest.update(" ".join((cc, *FLAGS)).encode())
    digest.update(" ".join(sorted(cpu_flags())).encode())
    target = cache_dir() / "kernels" / digest.hexdigest()[:16] / "mlakit_native.so"
    try:
        if not target.is_file():
            logger.info("building mlakit's CPU kernels at %s", target)
            _build(target, cc)
        return NativeKernels(target)
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("cannot build mlakit's CPU kernels (%s): PyTorch paths run instead", e)
        return None
