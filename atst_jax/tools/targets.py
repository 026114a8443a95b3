"""The hardware the planner can compile for: cloud accelerator-type names (``v5p-256``, ``h100-64``) → the
platform, the topology its compiler is given, the chip count and each chip's HBM, dense bf16 peak and the
interconnect bandwidth the roofline charges collectives at.

This module does not import JAX: the planner parses ``--target`` before JAX starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from atst_jax.errors import UserError
from atst_jax.flops import CHIPS

GB = 10**9


class TargetError(UserError):
    """An unknown or malformed ``--target``; one line, exit 2."""


@dataclasses.dataclass(frozen=True)
class Family:
    platform: str  # "tpu" or "cuda"
    chip: str  # the atst_jax.flops.CHIPS key: HBM and dense bf16 peak, as the training loop's MFU uses them
    # Bytes/s per chip that collectives are charged at in the roofline. TPUs: the vendor's bidirectional ICI
    # bandwidth per chip (all links; a torus collective can use every link, so this is the optimistic end).
    # GPUs: NVLink (per direction) inside one host; across hosts the per-GPU network adapter, which every
    # ring step then waits for.
    link_bytes_per_s: float
    cross_host_bytes_per_s: float | None = None
    cores_per_chip: int = 1  # the cloud's names count TensorCores for v4 and v5p (2 per chip)
    topology_rank: int = 2  # TPU: 2-D or 3-D torus
    topology_name: str = ""  # what get_topology_desc calls the chip
    gpus_per_host: int = 8

    @property
    def hbm_bytes(self) -> int:
        return CHIPS[self.chip]["hbm_bytes"]

    @property
    def peak_tflops(self) -> float:
        return CHIPS[self.chip]["peak_tflops"]


# Sources (HBM and peak: atst_jax.flops.CHIPS): Cloud TPU "System architecture" pages (ICI per chip); NVIDIA
# H100/H200/A100 datasheets (NVLink 900/900/600 GB/s bidirectional) and one 400/400/200 Gb/s InfiniBand
# adapter per GPU as in DGX systems.
FAMILIES = {
    "v4": Family("tpu", "v4", 300 * GB, cores_per_chip=2, topology_rank=3, topology_name="v4"),
    "v5litepod": Family("tpu", "v5e", 400 * GB, topology_name="v5e"),
    "v5p": Family("tpu", "v5p", 1200 * GB, cores_per_chip=2, topology_rank=3, topology_name="v5p"),
    "v6e": Family("tpu", "v6e", 800 * GB, topology_name="v6e"),
    "h100": Family("cuda", "h100", 450 * GB, 50 * GB, topology_name="h100"),
    "h200": Family("cuda", "h200", 450 * GB, 50 * GB, topology_name="h200"),
    "a100": Family("cuda", "a100", 300 * GB, 25 * GB, topology_name="a100"),
}  # fmt: skip

# What to install for each platform's compiler (pyproject extras).
EXTRAS = {"tpu": "tpu", "cuda": "cuda"}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    family: str
    spec: Family
    chips: int
    topology: str  # TPU: "v5p:4x4x8"; GPU: "slices x hosts x GPUs per host"

    @property
    def platform(self) -> str:
        return self.spec.platform

    @property
    def hosts(self) -> int:
        return math.ceil(self.chips / self.spec.gpus_per_host) if self.platform == "cuda" else 0

    @property
    def collective_bytes_per_s(self) -> float:
        if self.platform == "cuda" and self.chips > self.spec.gpus_per_host:
            return float(self.spec.cross_host_bytes_per_s)
        return float(self.spec.link_bytes_per_s)


def _torus(chips: int, rank: int) -> tuple[int, ...]:
    """The slice shape of ``chips`` chips: powers of two as even as possible, smallest first (v5p 128 chips →
    4x4x8, v5e 8 chips → 2x4), as the cloud's default shapes are."""
    if rank == 3 and chips == 4:  # one host: the 3-D families' smallest slice is flat
        return (2, 2, 1)
    dims = [1] * rank
    n = chips
    while n > 1:
        dims.sort()
        dims[0] *= 2
        n //= 2
    return tuple(sorted(dims))


def parse(text: str) -> Target:
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text or "")
    if not m or m.group(1) not in FAMILIES:
        names = ", ".join(f"{f}-N" for f in FAMILIES)
        raise TargetError(f"--target={text}: expected one of {names} (e.g. v5p-256, v6e-64, h100-64)")
    family, n = m.group(1), int(m.group(2))
    spec = FAMILIES[family]
    if n <= 0 or n % spec.cores_per_chip:
        raise TargetError(f"--target={text}: {family}-N counts TensorCores, 2 per chip; N must be even")
    chips = n // spec.cores_per_chip
    if spec.platform == "tpu":
        if chips & (chips - 1):
            raise TargetError(f"--target={text}: the planner knows power-of-two slices only ({chips} chips)")
        if chips < 4:  # single-host sub-slices need per-host bounds the planner does not model
            raise TargetError(
                f"--target={text}: the smallest slice the planner compiles for is 4 chips "
                f"({family}-{4 * spec.cores_per_chip})"
            )
        shape = _torus(chips, spec.topology_rank)
        topology = f"{spec.topology_name}:{'x'.join(map(str, shape))}"
    else:
        per_host = min(chips, spec.gpus_per_host)
        if chips % per_host:
            raise TargetError(f"--target={text}: more than {per_host} GPUs come in whole hosts of {per_host}")
        topology = f"1x{chips // per_host}x{per_host}"
    return Target(text, family, spec, chips, topology)


def compiler_installed(platform: str) -> bool:
    """Whether the compiler of ``platform`` ("tpu" or "cuda") is importable (checked without importing it)."""
    module = "libtpu" if platform == "tpu" else "jax_plugins.xla_cuda12"
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package (jax_plugins) is absent
        return False


def compiler_missing(target: Target) -> str | None:
    """One line naming the extra to install when the target's compiler is not importable, else None."""
    if compiler_installed(target.platform):
        return None
    extra = EXTRAS[target.platform]
    what = "libtpu" if target.platform == "tpu" else "the CUDA PJRT plugin and ptxas"
    return (
        f"--target={target.name} needs the {target.platform.upper()} compiler ({what}), which is not "
        f"installed: pip install -e '.[{extra}]' (or pip install -r requirements-{extra}.txt)"
    )


# A GPU target is described to XLA as a GpuTargetConfigProto (text form). The fields below are the ones the
# compiler reads to pick kernels and tile sizes; the values are the cards' published properties
# (SM count, shared memory, L2, HBM size and bandwidth, clock). The cuDNN version is what the fused-attention
# lowering checks; 9.x is what current CUDA 12 installs ship.
_GPU_DEVICES = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", cc=(9, 0), cores=132, smem_core=233472, smem_optin=232448,
                 l2=50 * 2**20, mem=80 * 2**30, mem_bw=3_352_320_000_000, clock=1.98),
    "h200": dict(name="NVIDIA H200", cc=(9, 0), cores=132, smem_core=233472, smem_optin=232448,
                 l2=50 * 2**20, mem=141 * GB, mem_bw=4_800_000_000_000, clock=1.98),
    "a100": dict(name="NVIDIA A100-SXM4-80GB", cc=(8, 0), cores=108, smem_core=167936, smem_optin=166912,
                 l2=40 * 2**20, mem=80 * 2**30, mem_bw=2_039_000_000_000, clock=1.41),
}  # fmt: skip


# The cuDNN the target config declares (9.8.0), in cuDNN's own integer spelling.
CUDNN_VERSION = 90800


def compute_capability(target: Target) -> tuple[int, int]:
    return _GPU_DEVICES[target.family]["cc"]


def gpu_target_config(family: str) -> str:
    d = _GPU_DEVICES[family]
    major, minor = d["cc"]
    return "\n".join(
        [
            "gpu_device_info {",
            "  threads_per_block_limit: 1024",
            "  threads_per_warp: 32",
            "  shared_memory_per_block: 49152",
            f"  shared_memory_per_core: {d['smem_core']}",
            "  threads_per_core_limit: 2048",
            f"  core_count: {d['cores']}",
            "  fpus_per_core: 128",
            "  block_dim_limit_x: 2147483647",
            "  block_dim_limit_y: 65535",
            "  block_dim_limit_z: 65535",
            f"  memory_bandwidth: {d['mem_bw']}",
            f"  l2_cache_size: {d['l2']}",
            f"  clock_rate_ghz: {d['clock']}",
            f"  device_memory_size: {d['mem']}",
            f"  shared_memory_per_block_optin: {d['smem_optin']}",
            f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
            "  registers_per_core_limit: 65536",
            "  registers_per_block_limit: 65536",
            "}",
            'platform_name: "CUDA"',
            "dnn_version_info { major: 9 minor: 8 patch: 0 }",
            f'device_description_str: "{d["name"]}"',
        ]
    )


def devices(target: Target):
    """The target's devices, from its compiler's topology description (no hardware needed)."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        # libtpu reads the slice it runs on from the environment and, on a machine that is no TPU VM, warns
        # on stderr for each variable it misses; naming the target (and a local host) keeps it quiet.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        # libtpu locks the host's TPU for one process; compiling opens no device, so planners (and a test
        # process beside them) may share it.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
    else:
        topo = topologies.get_topology_desc(
            platform="cuda",
            topology_name=target.spec.topology_name,
            target_config=gpu_target_config(target.family),
            topology=target.topology,
        )
    return list(topo.devices)
