"""The SageMaker GPU instance types ftstack knows: GPUs, their memory, EFA, and an hourly price.

One table, read by ``ftstack estimate``, the stack's configuration and the staging step's batch
check (``infra.instances``). Pure Python, so it loads anywhere, the staging Lambda included.

Where the figures come from, so that nobody mistakes them for more than they are:

- GPU counts per size and EFA support: AWS's instance type pages, from memory (no network here).
- ``gpu_mib``: the total that ``nvidia-smi`` reports for the GPU (what CUDA can address), not the
  nominal "24 GB": an A10G reports 23,028 MiB (22.5 GiB). From memory of those readings.
- ``bf16_tflops``: NVIDIA's dense (not 2:4 sparse) bf16 tensor-core peak per GPU, from memory of
  the datasheets; the A10G's figure is the least certain (AWS's A10G runs below the A10's clocks).
- ``price``: SageMaker training, on-demand, us-east-1, US$ per instance-hour: APPROXIMATE, recalled
  as of mid-2025 (AWS cut P4/P5 prices in June 2025, and which side of that cut each figure is
  from is not certain). Where no SageMaker figure was remembered, it is EC2's on-demand price x
  1.25, SageMaker's usual training premium, and for p5e/p5en, where neither was remembered,
  ml.p5.48xlarge's price; ``price_source`` says which. Check
  https://aws.amazon.com/sagemaker/pricing/ before relying on a cost.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftstack_train.contract import flex_fits

PRICE_DATE = "mid-2025"
"""When the prices below were last seen (from memory, not fetched)."""

PRICE_CAVEAT = (f"approximate SageMaker on-demand us-east-1 prices as recalled for {PRICE_DATE}, not fetched; "
                "check https://aws.amazon.com/sagemaker/pricing/")

MIB = 2**20


@dataclass(frozen=True)
class Gpu:
    """One GPU model."""

    name: str
    """NVIDIA's name for it."""
    mib: int
    """Memory as nvidia-smi reports it (MiB): what the CUDA context and PyTorch share."""
    bf16_tflops: float
    """Dense bf16 tensor-core peak (TFLOP/s), the MFU denominator; for GPUs without bf16 tensor
    cores (V100, T4), their fp32 peak."""
    bf16: bool = True
    """Whether it has bf16 tensor cores; without them the job's default precision crawls, so no
    estimate proposes such a type."""
    shared_memory: int = 101376
    """Shared memory one CUDA block may opt in to, in bytes (``shared_memory_per_block_optin``;
    CUDA programming guide, compute capabilities table): 163 KiB on A100, 227 KiB on H100/H200,
    99 KiB on the A10G, L4 and L40S (compute capability 8.6/8.9), 96 KiB on V100, 64 KiB on T4."""

    @property
    def flex(self) -> bool:
        """Whether FlexAttention's kernels fit it (``flex_fits``)."""
        return flex_fits(self.shared_memory)



A10G = Gpu("A10G", 23028, 70.0)
L4 = Gpu("L4", 23034, 121.0)
L40S = Gpu("L40S", 46068, 362.0)
A100_40 = Gpu("A100-SXM4-40GB", 40960, 312.0, shared_memory=166912)
A100_80 = Gpu("A100-SXM4-80GB", 81920, 312.0, shared_memory=166912)
H100 = Gpu("H100-SXM-80GB", 81559, 989.0, shared_memory=232448)
H200 = Gpu("H200-SXM-141GB", 143771, 989.0, shared_memory=232448)
# No bf16 tensor cores: the job's bf16 runs at about their fp32 peak, which is given instead.
V100_16 = Gpu("V100-SXM2-16GB", 16160, 15.7, bf16=False, shared_memory=98304)
V100_32 = Gpu("V100-SXM2-32GB", 32510, 15.7, bf16=False, shared_memory=98304)
T4 = Gpu("T4", 15360, 8.1, bf16=False, shared_memory=65536)


@dataclass(frozen=True)
class InstanceType:
    """One SageMaker training instance type."""

    name: str
    """``ml.<family>.<size>``."""
    gpu: Gpu
    """Its GPU model."""
    gpus: int
    """GPUs per instance."""
    efa: bool
    """Whether it has Elastic Fabric Adapter networking (multi-node collectives at full speed)."""
    price: float
    """US$ per instance-hour, on demand, us-east-1 (see the module docstring: approximate)."""
    price_source: str
    """``recalled`` (a SageMaker price remembered), ``ec2x1.25`` (EC2's price x 1.25) or
    ``assumed-p5`` (no figure known: ml.p5.48xlarge's)."""

    @property
    def gpu_bytes(self) -> int:
        """One GPU's memory in bytes, as the driver reports it."""
        return self.gpu.mib * MIB


def _family(family: str, gpu: Gpu, rows: tuple[tuple[str, int, bool, float, str], ...]) -> dict[str, InstanceType]:
    return {f"ml.{family}.{size}": InstanceType(f"ml.{family}.{size}", gpu, gpus, efa, price, source)
            for size, gpus, efa, price, source in rows}


# size, GPUs, EFA, US$/hour, where the price comes from
INSTANCE_TYPES: dict[str, InstanceType] = {
    **_family("g5", A10G, (
        ("xlarge", 1, False, 1.408, "recalled"), ("2xlarge", 1, False, 1.515, "recalled"),
        ("4xlarge", 1, False, 2.03, "recalled"), ("8xlarge", 1, True, 3.06, "recalled"),
        ("16xlarge", 1, True, 4.096 * 1.25, "ec2x1.25"), ("12xlarge", 4, True, 7.09, "recalled"),
        ("24xlarge", 4, True, 10.18, "recalled"), ("48xlarge", 8, True, 20.36, "recalled"),
    )),
    **_family("g6", L4, (
        ("xlarge", 1, False, 0.805 * 1.25, "ec2x1.25"), ("2xlarge", 1, False, 0.978 * 1.25, "ec2x1.25"),
        ("4xlarge", 1, False, 1.323 * 1.25, "ec2x1.25"), ("8xlarge", 1, True, 2.014 * 1.25, "ec2x1.25"),
        ("16xlarge", 1, True, 3.397 * 1.25, "ec2x1.25"), ("12xlarge", 4, True, 4.602 * 1.25, "ec2x1.25"),
        ("24xlarge", 4, True, 6.675 * 1.25, "ec2x1.25"), ("48xlarge", 8, True, 13.35 * 1.25, "ec2x1.25"),
    )),
    **_family("g6e", L40S, (
        ("xlarge", 1, False, 1.861 * 1.25, "ec2x1.25"), ("2xlarge", 1, False, 2.242 * 1.25, "ec2x1.25"),
        ("4xlarge", 1, False, 3.004 * 1.25, "ec2x1.25"), ("8xlarge", 1, True, 4.529 * 1.25, "ec2x1.25"),
        ("16xlarge", 1, True, 7.577 * 1.25, "ec2x1.25"), ("12xlarge", 4, True, 10.493 * 1.25, "ec2x1.25"),
        ("24xlarge", 4, True, 15.066 * 1.25, "ec2x1.25"), ("48xlarge", 8, True, 30.131 * 1.25, "ec2x1.25"),
    )),
    **_family("p4d", A100_40, (("24xlarge", 8, True, 37.688, "recalled"),)),
    **_family("p4de", A100_80, (("24xlarge", 8, True, 40.966 * 1.25, "ec2x1.25"),)),
    **_family("p5", H100, (("48xlarge", 8, True, 113.07, "recalled"),)),
    # No p5e/p5en training price was remembered: ml.p5.48xlarge's is shown, marked as such.
    **_family("p5e", H200, (("48xlarge", 8, True, 113.07, "assumed-p5"),)),
    **_family("p5en", H200, (("48xlarge", 8, True, 113.07, "assumed-p5"),)),
    # Older generations, still accepted by the stack's configuration and its batch check.
    **_family("p3", V100_16, (
        ("2xlarge", 1, False, 3.825, "recalled"), ("8xlarge", 4, False, 14.688, "recalled"),
        ("16xlarge", 8, False, 28.152, "recalled"),
    )),
    **_family("p3dn", V100_32, (("24xlarge", 8, True, 35.894, "recalled"),)),
    **_family("g4dn", T4, (
        ("xlarge", 1, False, 0.736, "recalled"), ("2xlarge", 1, False, 0.94, "recalled"),
        ("4xlarge", 1, False, 1.505, "recalled"), ("8xlarge", 1, True, 2.72, "recalled"),
        ("16xlarge", 1, True, 5.44, "recalled"), ("12xlarge", 4, True, 4.89, "recalled"),
    )),
}


class UnknownInstanceType(ValueError):
    """An instance type name that is not in INSTANCE_TYPES."""


def instance_type(name: str) -> InstanceType:
    """The instance type called ``name`` (``ml.`` may be left out). Raises UnknownInstanceType,
    naming the closest known types, for anything else."""
    key = name.strip().lower()
    key = key if key.startswith("ml.") else f"ml.{key}"
    if key in INSTANCE_TYPES:
        return INSTANCE_TYPES[key]
    family = key.split(".")[1] if key.count(".") >= 1 else ""
    same = [n for n in INSTANCE_TYPES if n.split(".")[1] == family]
    hint = ", ".join(same) if same else "the families " + ", ".join(sorted({n.split(".")[1] for n in INSTANCE_TYPES}))
    raise UnknownInstanceType(f"--instance-type: {name!r} is not a GPU training instance type ftstack knows; use one of {hint} "
                              "(see `ftstack estimate --list-instance-types`)")
