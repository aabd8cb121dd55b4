"""The engine on one GPU: DistriUNet against the plain UNet, CUDA graphs against eager, a band of
two (as threads, exact, and simulated, asynchronous), GroupNorm statistics in half precision.

Tolerances: fp16 outputs are compared by relative L2 error (||a - b|| / ||b||). Two fp16 runs of
the same layers in another order (bands, another kernel) differ by rounding, ~1e-3 here; the
bound is 1e-2, while a band that ignores its neighbours (naive_patch) is off by far more, and the
test checks that too. fp32 runs use no TF32, so they agree to 1e-5 as on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from ranks import ThreadRanks, build_unet, call, relative_error, unet_inputs

from distrifusion.collectives import ReplicatingCollective
from distrifusion.config import DistriConfig
from distrifusion.ops.group_norm import PatchGroupNorm, local_moments, merge_moments
from distrifusion.topology import Topology
from distrifusion.unet import DistriUNet, GenerationInfo

FP16_BOUND = 1e-2


@pytest.fixture(autouse=True)
def exact_fp32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def engine(dtype: str, cuda_graphs: bool, topology: Topology | None = None, **config) -> DistriUNet:
    settings = {"dtype": dtype, "device": "cuda", "cuda_graphs": cuda_graphs, **config}
    collective = ReplicatingCollective() if topology is not None else None
    return DistriUNet(
        build_unet(DistriConfig(**settings).torch_dtype),
        DistriConfig(**settings),
        topology=topology or Topology(),
        collective=collective,
    )


def steps(unet: DistriUNet, inputs: dict, count: int) -> list[torch.Tensor]:
    unet.begin_generation(GenerationInfo(do_classifier_free_guidance=True, num_timesteps=count))
    return [call(unet, inputs) for _ in range(count)]


@pytest.mark.parametrize(("dtype", "bound"), [("fp16", FP16_BOUND), ("fp32", 1e-5)])
def test_one_rank_equals_the_plain_unet(dtype: str, bound: float) -> None:
    torch_dtype = DistriConfig(dtype=dtype, device="cuda").torch_dtype
    inputs = unet_inputs(torch_dtype)
    plain = call(build_unet(torch_dtype), inputs)
    distri = call(engine(dtype, cuda_graphs=False), inputs)
    assert relative_error(distri, plain) <= bound


def test_cuda_graphs_equal_eager_at_one_rank_and_in_a_simulated_band() -> None:
    inputs = unet_inputs(torch.float16)
    for topology in (Topology(), Topology(world=2, rank=1)):
        eager = steps(engine("fp16", False, topology, warmup_steps=2), inputs, 8)
        graphed = steps(engine("fp16", True, topology, warmup_steps=2), inputs, 8)
        for index, (graph_step, eager_step) in enumerate(zip(graphed, eager, strict=True)):
            assert relative_error(graph_step, eager_step) <= 1e-3, (topology.world, index)


def test_graph_replay_after_a_change_of_shape_and_batch() -> None:
    graphed = engine("fp16", True, Topology(world=2, rank=0), warmup_steps=1)
    eager = engine("fp16", False, Topology(world=2, rank=0), warmup_steps=1)
    shapes = [{"height": 64}, {"height": 48}, {"batch": 4}, {"height": 64}]
    for shape in shapes:
        inputs = unet_inputs(torch.float16, **shape, seed=len(shape))
        for graph_step, eager_step in zip(steps(graphed, inputs, 5), steps(eager, inputs, 5), strict=True):
            assert relative_error(graph_step, eager_step) <= 1e-3, shape
    assert graphed.graphs.captures > 0


def test_full_sync_band_of_two_equals_the_plain_unet() -> None:
    inputs = unet_inputs(torch.float16)
    plain = call(build_unet(torch.float16), inputs)
    errors = {}
    for mode in ("full_sync", "naive_patch"):
        ranks = ThreadRanks(2)
        unets = [
            DistriUNet(
                build_unet(torch.float16),
                DistriConfig(mode=mode, dtype="fp16", device="cuda", cuda_graphs=False),
                topology=Topology(world=2, rank=rank),
                collective=ranks.collective(rank),
            )
            for rank in range(2)
        ]
        outputs = ranks.run(lambda rank, unets=unets: call(unets[rank], inputs))
        assert torch.equal(outputs[0], outputs[1]), "every rank returns the whole prediction"
        errors[mode] = relative_error(outputs[0], plain)
    assert errors["full_sync"] <= FP16_BOUND, errors
    assert errors["naive_patch"] > 10 * errors["full_sync"], errors


def test_asynchronous_simulated_bands_stay_finite() -> None:
    inputs = unet_inputs(torch.float16)
    for world in (2, 4, 8):
        for mode in ("corrected_async_gn", "stale_gn"):
            unet = engine("fp16", True, Topology(world=world, rank=world // 2), mode=mode)
            outputs = steps(unet, inputs, 10)
            assert all(torch.isfinite(output).all() for output in outputs), (world, mode)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_statistics_in_half_precision_match_fp64(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = (torch.randn(2, 64, 96, 128, device="cuda") * 3 + 1).to(dtype)
    reference = x.double().reshape(2, 32, -1)
    bands = x.chunk(3, dim=2)
    weights = torch.full((3,), 1 / 3, dtype=torch.float64, device="cuda")
    merged = merge_moments(torch.stack([local_moments(band, 32) for band in bands]), weights)
    assert torch.allclose(merged[0], reference.mean(-1), rtol=1e-5, atol=1e-6)
    assert torch.allclose(merged[1], reference.var(-1, unbiased=False), rtol=1e-5, atol=1e-6)
    # The normalisation itself (one batch_norm in the input's dtype) against fp64 GroupNorm.
    norm = torch.nn.GroupNorm(32, 64).to("cuda")
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    patch = PatchGroupNorm(norm, context=None, key="gn")  # type: ignore[arg-type]
    normalized = patch._normalize(x, merged)
    expected = torch.nn.functional.group_norm(
        x.double(), 32, norm.weight.double(), norm.bias.double(), norm.eps
    )
    tolerance = 1e-2 if dtype == torch.float16 else 5e-2  # one rounding of the output's dtype
    assert relative_error(normalized, expected) <= tolerance / 10
    assert (normalized.double() - expected).abs().max().item() <= tolerance * expected.abs().max().item()
