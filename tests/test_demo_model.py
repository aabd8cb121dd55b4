"""The demo model (demo_model/): its scene set, the detector that reads pictures back, and what the
shipped model draws."""

from __future__ import annotations

import pytest
from PIL import Image

from demo_model import SHIPPED
from demo_model.detector import DetectedObject, Detection, agreement, detect
from demo_model.scenes import COLOURS, PALETTE, SHAPES, Scene, SceneObject, random_scene, render


def test_a_seed_always_gives_the_same_scene_and_caption() -> None:
    assert random_scene(7) == random_scene(7) and random_scene(7) != random_scene(8)
    scene = Scene(
        background=("white",),
        objects=(
            SceneObject("triangle", "yellow", "small", 0.3, 0.3),
            SceneObject("square", "green", "large", 0.7, 0.7),
        ),
    )
    assert scene.caption == "a small yellow triangle and a green square on a white background"
    gradient = Scene(
        background=("orange", "blue"), objects=(SceneObject("circle", "red", "large", 0.5, 0.5),)
    )
    assert gradient.caption == "a red circle on an orange and blue gradient background"


def test_scenes_cover_every_colour_shape_and_count() -> None:
    scenes = [random_scene(seed) for seed in range(300)]
    assert {o.colour for s in scenes for o in s.objects} == set(COLOURS)
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {len(s.background) for s in scenes} == {1, 2}
    for scene in (s for s in scenes if len(s.background) == 1):  # what would be invisible is never drawn
        assert all(o.colour != scene.background[0] for o in scene.objects)


@pytest.mark.parametrize("size", [(128, 128), (256, 256), (64, 64), (256, 128), (96, 192)])
def test_the_detector_reads_rendered_scenes_at_any_size_and_aspect(size: tuple[int, int]) -> None:
    misread = []
    for seed in range(100):
        scene = random_scene(seed)
        found = agreement(scene, detect(render(scene, *size)))
        if not (found.background and found.colours and found.shapes and found.count):
            misread.append(scene.caption)
    assert not misread, f"{len(misread)} of 100 misread at {size}: {misread[:3]}"


def test_the_detector_reports_what_is_missing_or_wrong() -> None:
    scene = Scene(background=("blue",), objects=(SceneObject("circle", "red", "large", 0.5, 0.5),))
    blank = Image.new("RGB", (128, 128), PALETTE["blue"])
    assert detect(blank) == Detection(background=("blue",), objects=())
    empty = agreement(scene, detect(blank))
    assert empty.background and not (empty.colours or empty.shapes or empty.count)
    assert empty.objects_found == 0
    wrong_shape = Scene(background=("blue",), objects=(SceneObject("square", "red", "large", 0.5, 0.5),))
    found = agreement(scene, detect(render(wrong_shape, 128, 128)))
    assert found.colours and found.count and not found.shapes
    assert detect(render(wrong_shape, 128, 128)).objects[0] == DetectedObject(
        "red", "square", pytest.approx(0.1444, abs=0.01)
    )


# --- the shipped model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out() -> list[Scene]:
    from benchmarks.prompt_following import held_out_scenes

    return [scene for _, scene in held_out_scenes(4)]


@pytest.mark.slow
def test_the_shipped_model_draws_the_backgrounds_held_out_prompts_say(held_out: list[Scene]) -> None:
    """Through diffusers' own SDXL pipeline, on prompts and seeds the training never saw (the served
    ensemble's figures: benchmarks/prompt_following.py)."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(SHIPPED, dtype=torch.float32, local_files_only=True)
    images = pipe(
        prompt=[s.caption for s in held_out],
        height=256,
        width=256,
        num_inference_steps=20,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    ).images
    found = [agreement(s, detect(image)) for s, image in zip(held_out, images, strict=True)]
    # Every background as prompted (by chance: 1 in 8 each). The objects' colours and shapes are
    # not asserted: the shipped model draws them as blobs (benchmarks/prompt_following.py: 14% of
    # prompts with every colour right, 9% with every shape).
    assert all(f.background for f in found), found


@pytest.mark.slow
def test_distrifusion_keeps_the_one_device_picture_better_than_naive_patches(held_out: list[Scene]) -> None:
    """The paper's claim (Table 1), at the trained size on 2 gloo ranks (no more than the cores
    here; benchmarks/fidelity.py runs 4 and 8): corrected_async_gn is closer to the 1-rank picture
    than naive patches, by a margin (two prompts; the benchmark's margin on 2 ranks is 19 dB)."""
    from benchmarks.fidelity import compare, draw

    scenes = held_out[:2]
    one = draw(scenes, seed=1, size=256, ranks=1, mode="full_sync", steps=12)
    ours = compare(draw(scenes, 1, 256, 2, "corrected_async_gn", 12), one, scenes)
    naive = compare(draw(scenes, 1, 256, 2, "naive_patch", 12), one, scenes)
    assert ours["psnr_db"] > naive["psnr_db"] + 3, (ours, naive)
    assert ours["ssim"] > naive["ssim"], (ours, naive)
