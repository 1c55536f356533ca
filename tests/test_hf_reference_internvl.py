"""The InternVL transformers reference itself (tests/hf_reference_internvl.py), without vLLM.

Checks what later engine tests will lean on: tile counts (also as vLLM counts them, from the
image processor's attributes), the [CLS] attention against a recomputation from the layer's own
q/k, the 2x2 pixel-shuffle grouping of scores and features against hand-made maps, per-tile
normalisation, the unpruned embeddings against transformers' `get_image_features`, the pruned
ones against `id_select`, and the greedy loop against transformers' `generate`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from devtools.tiny_internvl import TOKENS_PER_TILE, write_tiny_internvl
from idselect.importance import cls_attention
from idselect.selection import id_select
from tests.conftest import make_image
from tests.hf_reference_internvl import HFInternVL

# (width, height) -> tiles: one 448 tile; a 2x1 grid + thumbnail; a 1x3 grid + thumbnail.
SQUARE, WIDE, TALL = (448, 448), (900, 500), (300, 800)
TILES = {SQUARE: 1, WIDE: 3, TALL: 4}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_internvl(tmp_path_factory.mktemp("models") / "tiny-internvl")


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> HFInternVL:
    return HFInternVL(model_dir)


@pytest.mark.parametrize("size", list(TILES))
def test_tiles_and_token_counts(ref: HFInternVL, size: tuple[int, int]) -> None:
    pixels, count = ref.tiles(make_image(1, size))
    assert pixels.shape == (TILES[size], 3, 448, 448)
    assert count == TOKENS_PER_TILE * TILES[size]
    # vLLM's InternS1ProcessingInfo.get_num_image_tokens: the image processor's own attributes
    # (crop_to_patches among them), no call kwargs.
    w, h = size
    assert ref.processor.image_processor.get_number_of_image_patches(h, w, {}) == TILES[size]
    features, scores, tile_of_token = ref.vision(make_image(1, size))
    assert features.shape == (count, 4 * ref.config.vision_config.hidden_size)
    assert scores.shape == tile_of_token.shape == (count,)


def test_thumbnail_is_the_last_tile(ref: HFInternVL) -> None:
    """With a grid of more than one tile, the last tile is the whole image at 448 x 448."""
    image = make_image(2, WIDE)
    pixels, _ = ref.tiles(image)
    whole = ref.processor.image_processor(images=[image], crop_to_patches=False,
                                          return_tensors="pt").pixel_values
    assert whole.shape == (1, 3, 448, 448)
    torch.testing.assert_close(pixels[-1], whole[0])
    assert not torch.allclose(pixels[0], whole[0], atol=0.1)


def test_attention_equals_recomputation_from_q_k(ref: HFInternVL) -> None:
    """The eager attention probabilities of the feature layer equal softmax(q k^T * scale) from
    the layer's own q/k projections of its input, as a pre-hook on the attention would see it."""
    image = make_image(3, WIDE)
    tower = ref.model.model.vision_tower
    attention = tower.encoder.layer[ref._attention_index()].attention
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs) -> None:
        seen.append(kwargs.get("hidden_states", args[0] if args else None))

    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        t = ref.tower(image)
    finally:
        handle.remove()
    (x,) = seen
    with torch.inference_mode():
        q = attention.q_norm(attention.q_proj(x))
        k = attention.k_norm(attention.k_proj(x))
    scores = cls_attention(q, k, attention.num_heads, attention.scale, reduce="sum")
    torch.testing.assert_close(scores, t.attention, rtol=1e-5, atol=1e-6)
    # Each tile's [CLS] row is a distribution over its own 1025 tokens, per head.
    heads = attention.num_heads
    assert torch.all(t.attention.sum(-1) < heads) and torch.all(t.attention.sum(-1) > 0)
    assert t.attention.shape == (TILES[WIDE], 1024)


def _blocks(tokens: int, side: int = 16) -> torch.Tensor:
    """For each token t = side*i + j: its patches (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1)."""
    rows = []
    for t in range(tokens):
        i, j = divmod(t, side)
        p = 2 * i * 2 * side + 2 * j
        rows.append([p, p + 1, p + 2 * side, p + 2 * side + 1])
    return torch.tensor(rows)


def test_grouping_with_hand_made_maps(ref: HFInternVL) -> None:
    blocks = _blocks(256)
    # An index map through the model's own pixel shuffle: the channel blocks of token t hold
    # exactly these patches, in this order.
    index = torch.arange(1024, dtype=torch.float32).reshape(1, 1024, 1)
    assert torch.equal(ref.shuffle(index)[0].long(), blocks)
    # One hot patch per tile lands on its token only; tiles stay independent.
    for r, c in [(0, 0), (0, 31), (31, 0), (31, 31), (5, 7), (16, 17)]:
        scores = torch.zeros(2, 1024)
        scores[0, 32 * r + c] = 1.0
        scores[1, 32 * (31 - r) + c] = 2.0
        grouped = ref.group(scores)
        expect = torch.zeros(2, 256)
        expect[0, 16 * (r // 2) + c // 2] = 1.0
        expect[1, 16 * ((31 - r) // 2) + c // 2] = 2.0
        assert torch.equal(grouped, expect), (r, c)
    # A random map: the sum over each 2x2 block, written as a reshape (p = 64i + 32a + 2j + b).
    scores = torch.rand(3, 1024, generator=torch.Generator().manual_seed(0))
    expect = scores.reshape(3, 16, 2, 16, 2).sum(dim=(2, 4)).reshape(3, 256)
    torch.testing.assert_close(ref.group(scores), expect)
    torch.testing.assert_close(ref.group(scores), scores[:, blocks].sum(-1))


def test_features_are_the_concatenated_2x2_patches(ref: HFInternVL) -> None:
    image = make_image(4, WIDE)
    t = ref.tower(image)
    features, _, tile_of_token = ref.vision(image)
    dim = t.patches.shape[-1]
    blocks = _blocks(256)
    expect = t.patches[:, blocks].reshape(t.patches.shape[0] * 256, 4 * dim)
    assert torch.equal(features, expect)
    assert torch.equal(tile_of_token, torch.arange(TILES[WIDE]).repeat_interleave(256))


def test_scores_are_normalised_per_tile(ref: HFInternVL) -> None:
    image = make_image(5, TALL)
    _, scores, tile_of_token = ref.vision(image)
    per_tile = scores.reshape(TILES[TALL], 256)
    assert torch.equal(per_tile.amin(-1), torch.zeros(TILES[TALL]))
    assert torch.equal(per_tile.amax(-1), torch.ones(TILES[TALL]))
    raw = ref.tower(image).attention.reshape(-1, 16, 2, 16, 2).sum(dim=(2, 4)).reshape(-1, 256)
    low, high = raw.amin(-1, keepdim=True), raw.amax(-1, keepdim=True)
    torch.testing.assert_close(per_tile, (raw - low) / (high - low))
    assert torch.equal(tile_of_token, torch.arange(TILES[TALL]).repeat_interleave(256))


@pytest.mark.parametrize("size", [SQUARE, WIDE])
def test_unpruned_embeddings_are_transformers_own(ref: HFInternVL, size) -> None:
    image = make_image(6, size)
    embeds = ref.image_embeds(image, None)
    pixels, count = ref.tiles(image)
    with torch.inference_mode():
        own = ref.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    assert own.shape == (TILES[size], TOKENS_PER_TILE, ref.config.text_config.hidden_size)
    assert torch.equal(embeds, own.reshape(count, -1))
    features, _, _ = ref.vision(image)
    torch.testing.assert_close(ref.project(features), embeds, rtol=1e-5, atol=1e-5)
    assert torch.equal(ref.image_embeds(image, count), embeds)  # K >= N: unpruned


@pytest.mark.parametrize("budget", [1, 17, 300])
def test_pruned_embeddings_are_the_projected_picks(ref: HFInternVL, budget: int) -> None:
    image = make_image(7, WIDE)
    embeds = ref.image_embeds(image, budget)
    assert embeds.shape == (budget, ref.config.text_config.hidden_size)
    features, scores, _ = ref.vision(image)
    picks = id_select(features, scores, budget)
    assert torch.equal(picks, picks.sort().values)
    torch.testing.assert_close(embeds, ref.project(features[picks]))


def test_greedy_matches_transformers_generate(ref: HFInternVL) -> None:
    images = [make_image(8, SQUARE), make_image(9, WIDE)]
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare the pictures."},
    ]}]
    prompt = ref.processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = ref.prompt_ids(prompt, images)
    context = ids.count(ref.image_token_id)
    assert context == TOKENS_PER_TILE * (TILES[SQUARE] + TILES[WIDE])
    steps = 4
    mine = ref.greedy(ids, [ref.image_embeds(image, None) for image in images], steps)
    inputs = ref.processor(text=[prompt], images=images, return_tensors="pt")
    with torch.inference_mode():
        out = ref.model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    assert out[0, len(ids):].tolist() == mine
