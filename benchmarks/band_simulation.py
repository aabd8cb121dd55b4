"""One band of an n-rank DistriFusion group, computed in a single process without communication.

Used by the benchmarks to measure the compute of one rank's band without n devices: a DistriUNet
whose topology says "n ranks, I am band r" (a :class:`~distrifusion.topology.Topology` built by
hand) and whose all-gathers are a :class:`~distrifusion.collectives.ReplicatingCollective`, which
copies this rank's tensor into every rank's slot ("the other bands" are this band's data, plausible
stale data of the right shape). The layers do exactly the work a rank of an n-rank group does (its
band, halos, whole-image keys/values, moment merging, the batched send and receive buffers);
nothing crosses an interconnect and no communication kernel or thread competes with the compute.
A measurement of the compute only.
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel

from distrifusion.collectives import ReplicatingCollective
from distrifusion.config import DistriConfig
from distrifusion.topology import Topology
from distrifusion.unet import DistriUNet, GenerationInfo


def simulated_band_unet(unet: UNet2DConditionModel, config: DistriConfig) -> DistriUNet:
    """``unet`` wrapped (in place) as a DistriUNet of one rank whose all-gathers need no peers;
    :func:`simulate` then makes it any band of any band count."""
    return DistriUNet(unet, config, topology=Topology(), collective=ReplicatingCollective())


def simulate(unet: DistriUNet, world: int, rank: int) -> None:
    """From the next step on, ``unet`` computes band ``rank`` of ``world`` bands (fresh exchange
    buffers and step graphs; call ``begin_generation`` after it, as before any denoising loop)."""
    unet.use_topology(Topology(world=world, rank=rank), ReplicatingCollective())


def endless_generation() -> GenerationInfo:
    """A generation with classifier-free guidance that never reaches its last step: every step
    after the warm-up is a steady (asynchronous) one, however many are run."""
    return GenerationInfo(do_classifier_free_guidance=True, num_timesteps=10**9)
