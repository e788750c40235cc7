"""Synthetic multimodal recommendation dataset with a ground-truth oracle (``recsys data synth``).

Generative story (every knob is in ``SynthParams`` and written to ``truth.json``):

- Users have a latent preference vector ``u`` (d dims, unit variance per dim) that mixes a
  personal part with a shared regional taste (``region`` in users.parquet), an ``age``, a
  click propensity and a rating leniency.
- Items have a latent vector ``v = sqrt(a) topic + sqrt(b) visual + sqrt(c) residual``:
  (a) a topic embedding (12 topics) that the text shows: titles and descriptions draw
  topic-specific nouns, mixed with generic noise words and the odd word of another topic;
  (b) a visual embedding of the dominant hue (continuous) and the texture (plain, stripes,
  dots, checker) that the image shows (PNG, ``image_size`` px; lightness, stripe angle and
  pixel noise are nuisance); (c) an id-only residual that only interactions reveal. Items
  also get a popularity (log impression weight, also a click bias), a ``price`` that
  lowers conversion, a coarse ``category`` (topic group), a creation time and a
  ``quality`` grade (5 levels, standardised to unit variance) that only the text shows:
  ``quality_words`` words of the grade's lexicon are inserted into the description (``QUALITY_WORDS``:
  "flimsy, shoddy" ... "superb, flawless"); the image and the ids do not show it.
- Users also have a taste for each texture (centred over the 4 textures, unit variance):
  a preference that reads an attribute only the image shows.
- Impressions: timestamps uniform over ``span_days``; the user by activity weight; the item
  by popularity among the items created by then, so items created late are cold (never
  seen in the temporally earlier data) - the content-based cold start case.
- Labels, as in the MMoE paper's synthetic study: three task weight vectors, with
  ``cos(w_click, w_conversion) = task_correlation``, read the user x item affinity
  ``w . (u * v)`` (unit variance):
  ``p_click = sigmoid(b_c + s_c aff_click + popularity + user propensity)``,
  ``p_conversion (given click) = sigmoid(b_v + s_v aff_conversion + price and age terms
  + texture_conversion taste[user, texture] + quality_conversion quality)``,
  ``rating_mean = 1 + 4 sigmoid(b_r + s_r aff_rating + user leniency)``.
  ``click ~ Bernoulli(p_click)``; ``conversion ~ Bernoulli(p_conversion)`` only when
  clicked; on clicked rows ``rating = 1 + Binomial(4, (rating_mean - 1) / 4)`` (integer
  stars with expectation exactly ``rating_mean``), null otherwise.

Files: ``items.parquet``, ``users.parquet``, ``interactions.parquet`` (DESIGN.md dataset
contract, rows in time order), ``images/i<k>.png``, and the oracle: ``truth.parquet`` (one
row per interaction, same order: the true ``p_click``, ``p_conversion``, ``p_ctcvr``,
``rating_mean``, and ``p_click_content``: the click probability as far as the item's text and
image tell it - no residual, average popularity - the ceiling for cold items),
``truth_items.parquet`` (each item's topic, hue, texture, quality, price, popularity, latent and
its content-visible part), ``truth_users.parquet`` (each user's latent, biases and texture
taste) and ``truth.json`` (parameters, weight vectors, oracle AUCs).

Random streams: ``[seed, k]`` per part of the story; the texture taste (k = 8) and the quality
(k = 9) have streams of their own, so the other draws are those of a dataset without them.

Daily logs with arriving users and drifting preferences (``--days``) unroll this story in
``features/synth_stream.py``; ``_impressions`` draws any time window from given user latents.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image
from tqdm import tqdm

from recsys.errors import DataError
from recsys.metrics import auc
from recsys.rundir import write_json, write_parquet

TOPIC_WORDS: dict[str, tuple[str, ...]] = {
    "kitchen": ("skillet", "whisk", "saucepan", "spatula", "cutlery", "kettle", "colander", "ladle", "teapot", "grater"),
    "garden": ("trowel", "planter", "hose", "seedling", "pruner", "compost", "trellis", "sprinkler", "shears", "mulch"),
    "office": ("stapler", "notebook", "binder", "highlighter", "envelope", "calculator", "clipboard", "desk", "folder", "printer"),
    "audio": ("headphones", "speaker", "amplifier", "turntable", "subwoofer", "earbuds", "microphone", "soundbar", "receiver", "equalizer"),
    "gaming": ("console", "joystick", "controller", "gamepad", "arcade", "headset", "keyboard", "mousepad", "cartridge", "esports"),
    "reading": ("novel", "paperback", "hardcover", "anthology", "memoir", "bookmark", "atlas", "biography", "poetry", "chapter"),
    "camping": ("tent", "lantern", "backpack", "compass", "hammock", "stove", "canteen", "tarp", "carabiner", "headlamp"),
    "fitness": ("dumbbell", "kettlebell", "treadmill", "yoga", "barbell", "rower", "jumprope", "protein", "stretching", "workout"),
    "cycling": ("bicycle", "helmet", "pedal", "derailleur", "saddle", "handlebar", "chainring", "spokes", "tyre", "pump"),
    "baby": ("stroller", "pacifier", "crib", "diaper", "rattle", "onesie", "bib", "teether", "babycarrier", "playmat"),
    "pets": ("leash", "collar", "kibble", "aquarium", "catnip", "scratcher", "litter", "birdcage", "chewtoy", "harness"),
    "beauty": ("lipstick", "serum", "moisturizer", "mascara", "perfume", "cleanser", "eyeliner", "blush", "shampoo", "conditioner"),
}
TOPICS: tuple[str, ...] = tuple(TOPIC_WORDS)
# category = coarse topic group: visible as a categorical item feature, coarser than the text.
TOPIC_CATEGORY: dict[str, str] = {
    "kitchen": "home", "garden": "home", "office": "home",
    "audio": "electronics", "gaming": "electronics", "reading": "electronics",
    "camping": "outdoor", "fitness": "outdoor", "cycling": "outdoor",
    "baby": "family", "pets": "family", "beauty": "family",
}  # fmt: skip
ADJECTIVES: tuple[str, ...] = (
    "Classic", "Premium", "Compact", "Deluxe", "Essential", "Modern", "Portable", "Rugged",
    "Vintage", "Everyday", "Lightweight", "Professional", "Budget", "Signature", "Eco", "Smart",
)  # fmt: skip
NOISE_WORDS: tuple[str, ...] = (
    "with", "for", "and", "the", "durable", "quality", "design", "easy", "use", "daily", "great",
    "value", "set", "pack", "edition", "series", "model", "style", "new", "original", "best",
    "gift", "size", "brand", "classic", "perfect", "simple", "reliable", "choice", "home",
)  # fmt: skip
TEXTURES: tuple[str, ...] = ("plain", "stripes", "dots", "checker")
# Words of each quality grade, worst to best: the text is the only place an item's quality shows.
QUALITY_WORDS: tuple[tuple[str, ...], ...] = (
    ("flimsy", "shoddy", "fragile"),
    ("cheap", "wobbly", "basic"),
    ("standard", "ordinary", "average"),
    ("sturdy", "solid", "robust"),
    ("superb", "flawless", "exquisite"),
)
REGIONS: tuple[str, ...] = ("north", "south", "east", "west", "central", "islands")

DESCRIPTION_WORDS = 12  # words after the title
WORDS_PER_TOPIC = 10
DAY_S = 86_400
AUC_MAX_ROWS = 2_000_000  # oracle AUCs in the summary use about this many rows at most


@dataclass(frozen=True)
class SynthParams:
    """Knobs of the generative story (all written to truth.json)."""

    latent_dim: int = 8
    topic_share: float = 0.45  # variance shares of the item latent: text-visible topic,
    visual_share: float = 0.30  # image-visible hue + texture,
    residual_share: float = 0.25  # id-only residual
    region_share: float = 0.2  # share of the user latent that is the regional taste
    click_bias: float = -2.0
    click_scale: float = 1.6
    popularity_click: float = 0.4  # click logit per popularity sd
    user_click_sd: float = 0.3
    conversion_bias: float = -1.8  # -1.7 before the texture and quality terms: keeps the conversion rate
    conversion_scale: float = 1.4
    price_conversion: float = -0.35  # conversion logit per sd of log price
    age_conversion: float = 0.2  # conversion logit per sd of age
    texture_conversion: float = 0.8  # conversion logit per sd of the user's taste for the item's texture (image only)
    quality_conversion: float = 0.6  # conversion logit per sd of the item's quality (text only)
    rating_bias: float = 0.5
    rating_scale: float = 1.4
    user_rating_sd: float = 0.4
    popularity_sd: float = 1.0  # sd of an item's log impression weight
    activity_sd: float = 0.5  # sd of a user's log impression weight
    new_item_fraction: float = 0.3  # items created during the observed span (the rest exist before it)
    start_s: int = 1_700_000_000
    span_days: int = 90
    log_price_mean: float = 3.0
    log_price_sd: float = 0.8
    topic_word_rate: float = 0.5  # share of description words drawn from the item's topic
    distractor_rate: float = 0.3  # chance of one word of another topic in the description
    quality_words: int = 2  # words of the item's quality grade inserted into the description (0: quality invisible)
    image_size: int = 64
    chunk_rows: int = 1_000_000  # impressions generated per chunk (bounds memory)


@dataclass(frozen=True)
class _Tables:
    """Fixed random tables of the story: embeddings and task weights."""

    topic: np.ndarray  # (n_topics, d)
    hue_cos: np.ndarray  # (d,)
    hue_sin: np.ndarray  # (d,)
    texture: np.ndarray  # (n_textures, d)
    region: np.ndarray  # (n_regions, d)
    w_click: np.ndarray  # (d,) unit
    w_conversion: np.ndarray  # (d,) unit, cos with w_click = task_correlation
    w_rating: np.ndarray  # (d,) unit


@dataclass(frozen=True)
class _Users:
    latent: np.ndarray  # (U, d) float32
    region: np.ndarray  # (U,) int
    age: np.ndarray  # (U,) int64 years
    click_bias: np.ndarray  # (U,)
    rating_bias: np.ndarray  # (U,)
    texture_taste: np.ndarray  # (U, n_textures): centred per user, unit variance
    activity: np.ndarray  # (U,) impression weight
    arrived_at: np.ndarray  # (U,) int64 unix s: impressions only after it (all at start_s here; the stream draws arrivals)


@dataclass(frozen=True)
class _Items:
    latent: np.ndarray  # (I, d) float32
    content_latent: np.ndarray  # (I, d) float32: the topic + visual part, what text and image show
    topic: np.ndarray  # (I,) int
    hue: np.ndarray  # (I,) in [0, 1)
    texture: np.ndarray  # (I,) int
    lightness: np.ndarray  # (I,) HSV value of the base colour (nuisance)
    angle: np.ndarray  # (I,) stripe angle in radians (nuisance)
    popularity: np.ndarray  # (I,) standard normal; log impression weight = popularity_sd * popularity
    price: np.ndarray  # (I,) rounded to cents
    quality_grade: np.ndarray  # (I,) int in [0, len(QUALITY_WORDS))
    quality: np.ndarray  # (I,) the grade standardised: mean 0, unit variance
    created_at: np.ndarray  # (I,) int64 unix s


def synthesize(
    out: Path,
    users: int = 2000,
    items: int = 1000,
    interactions: int | None = None,
    seed: int = 0,
    images: bool = True,
    task_correlation: float = 0.8,
    params: SynthParams | None = None,
) -> dict[str, Any]:
    """Write a synthetic dataset directory (+ oracle) to ``out``; returns a JSON-able summary."""
    params = params or SynthParams()
    n_rows = 50 * users if interactions is None else interactions
    _check_args(Path(out), users, items, n_rows, seed, task_correlation, params)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    tables = _tables(np.random.default_rng([seed, 1]), params, task_correlation)
    user_draw = _draw_users(np.random.default_rng([seed, 2]), np.random.default_rng([seed, 8]), users, tables, params)
    item_draw = _draw_items(np.random.default_rng([seed, 3]), np.random.default_rng([seed, 9]), items, tables, params)
    user_ids = _ids("u", users, "user_id")
    item_ids = _ids("i", items, "item_id")
    timings["latents_s"] = time.perf_counter() - started

    tick = time.perf_counter()
    if images:
        _write_images(out, item_draw, seed, params)
    write_parquet(_catalogue(seed, item_ids, item_draw, params, images), out / "items.parquet")
    write_parquet(_truth_items(item_ids, item_draw), out / "truth_items.parquet")
    write_parquet(_user_table(user_ids, user_draw), out / "users.parquet")
    write_parquet(_truth_users(user_ids, user_draw), out / "truth_users.parquet")
    timings["catalogue_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    rows = _impressions((seed,), n_rows, params.start_s, params.start_s + params.span_days * DAY_S, user_draw, item_draw, tables, params)
    timings["impressions_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    _write_rows(out, user_ids, item_ids, rows)
    timings["write_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    stats = _label_stats(rows, item_draw)
    timings["stats_s"] = time.perf_counter() - tick
    truth = _truth_summary(seed, users, items, n_rows, images, task_correlation, params, tables, stats)
    write_json(out / "truth.json", truth)
    timings["total_s"] = time.perf_counter() - started
    return {
        "out": str(out),
        "users": users,
        "items": items,
        "interactions": n_rows,
        "images": images,
        "task_correlation": task_correlation,
        **stats,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _catalogue(seed: int, item_ids: pl.Series, draw: _Items, params: SynthParams, images: bool) -> pl.DataFrame:
    """items.parquet: id, text, image path (``images/<id>.png``, when rendered), category, price, created_at."""
    frame = pl.DataFrame(
        {
            "item_id": item_ids,
            "text": item_text(np.random.default_rng([seed, 4]), draw.topic, params, draw.quality_grade),
            "category": pl.Series(np.array([TOPIC_CATEGORY[t] for t in TOPICS]))[draw.topic],
            "price": draw.price,
            "created_at": draw.created_at,
        }
    )
    return frame.insert_column(2, ("images/" + item_ids + ".png").alias("image")) if images else frame


def _user_table(user_ids: pl.Series, draw: _Users) -> pl.DataFrame:
    """users.parquet: id, region, age."""
    return pl.DataFrame({"user_id": user_ids, "region": pl.Series(np.array(REGIONS))[draw.region], "age": draw.age})


def _write_rows(out: Path, user_ids: pl.Series, item_ids: pl.Series, rows: dict[str, np.ndarray]) -> None:
    """interactions.parquet (labels) and truth.parquet (the oracle's probabilities), row for row."""
    keys = pl.DataFrame(
        {"user_id": user_ids[rows["user"]], "item_id": item_ids[rows["item"]], "timestamp": rows["timestamp"]}
    )
    interaction_frame = keys.with_columns(
        pl.Series("click", rows["click"]),
        pl.Series("conversion", rows["conversion"]),
        pl.Series("rating", rows["rating"], nan_to_null=True),
    )
    write_parquet(interaction_frame, out / "interactions.parquet")
    truth_frame = keys.with_columns(
        pl.Series("p_click", rows["p_click"]),
        pl.Series("p_conversion", rows["p_conversion"]),
        pl.Series("p_ctcvr", rows["p_click"] * rows["p_conversion"]),
        pl.Series("rating_mean", rows["rating_mean"]),
        pl.Series("p_click_content", rows["p_click_content"]),
    )
    write_parquet(truth_frame, out / "truth.parquet")


def _arguments(seed: int, users: int, items: int, n_rows: int, images: bool, task_correlation: float) -> dict[str, Any]:
    """The generator's arguments, as truth.json and stream.json record them."""
    return {"seed": seed, "users": users, "items": items, "interactions": n_rows, "images": images, "task_correlation": task_correlation}


def _truth_summary(
    seed: int, users: int, items: int, n_rows: int, images: bool, task_correlation: float,
    params: SynthParams, tables: _Tables, stats: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The body of truth.json: arguments, every knob, the random tables, the vocabularies and the label stats."""
    return {
        **_arguments(seed, users, items, n_rows, images, task_correlation),
        "params": asdict(params),
        "tables": {k: np.asarray(v).tolist() for k, v in asdict(tables).items()},
        "topics": {t: {"category": TOPIC_CATEGORY[t], "words": list(TOPIC_WORDS[t])} for t in TOPICS},
        "textures": list(TEXTURES),
        "quality_words": [list(words) for words in QUALITY_WORDS],
        "regions": list(REGIONS),
        "stats": stats,
    }


def _ids(prefix: str, n: int, name: str) -> pl.Series:
    """``prefix0 .. prefix{n-1}`` as a string Series."""
    return pl.select(pl.format(prefix + "{}", pl.int_range(n, dtype=pl.Int64)).alias(name)).to_series()


def _check_args(
    out: Path, users: int, items: int, n_rows: int, seed: int, task_correlation: float, params: SynthParams
) -> None:
    """Reject sizes and knobs the story cannot honour, with messages naming the argument."""
    for name, value in (("--users", users), ("--items", items), ("--interactions", n_rows)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DataError(f"synth: {name} must be a positive integer, got {value!r}")
        if value >= 2**31:
            raise DataError(f"synth: {name}={value} is too large (at most {2**31 - 1})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"synth: --seed must be a non-negative integer, got {seed!r}")
    if not -1.0 <= task_correlation <= 1.0:
        raise DataError(f"synth: --task-correlation must lie in [-1, 1], got {task_correlation}")
    if out.exists() and not out.is_dir():
        raise DataError(f"synth: --out {out} exists and is not a directory")
    shares = params.topic_share + params.visual_share + params.residual_share
    smallest = min(params.topic_share, params.visual_share, params.residual_share)
    if not math.isclose(shares, 1.0, abs_tol=1e-6) or smallest < 0:
        raise DataError(f"synth: topic/visual/residual shares must be >= 0 and sum to 1, got sum {shares}")
    if not 0 <= params.new_item_fraction < 1 or params.span_days < 1 or params.chunk_rows < 1 or params.image_size < 8:
        raise DataError("synth: need 0 <= new_item_fraction < 1, span_days >= 1, chunk_rows >= 1, image_size >= 8")
    if not 0 <= params.quality_words <= DESCRIPTION_WORDS:
        raise DataError(f"synth: quality_words must lie in [0, {DESCRIPTION_WORDS}] (description words), got {params.quality_words}")


def _tables(rng: np.random.Generator, params: SynthParams, task_correlation: float) -> _Tables:
    """Embedding tables and the three unit task weight vectors (MMoE-paper construction)."""
    d = params.latent_dim
    basis, _ = np.linalg.qr(rng.standard_normal((d, 3)))  # orthonormal e1, e2, e3
    e1, e2, e3 = basis.T
    w_click = e1
    w_conversion = task_correlation * e1 + math.sqrt(max(0.0, 1.0 - task_correlation**2)) * e2
    w_rating = 0.5 * w_click + 0.5 * w_conversion + 0.5 * e3
    return _Tables(
        topic=rng.standard_normal((len(TOPICS), d)),
        hue_cos=rng.standard_normal(d),
        hue_sin=rng.standard_normal(d),
        texture=rng.standard_normal((len(TEXTURES), d)),
        region=rng.standard_normal((len(REGIONS), d)),
        w_click=w_click,
        w_conversion=w_conversion / np.linalg.norm(w_conversion),
        w_rating=w_rating / np.linalg.norm(w_rating),
    )


def _draw_users(rng: np.random.Generator, taste_rng: np.random.Generator, n: int, tables: _Tables, params: SynthParams) -> _Users:
    """User latents (personal + regional taste), demographics, biases, texture taste and activity."""
    region = rng.integers(0, len(REGIONS), n)
    personal = rng.standard_normal((n, params.latent_dim))
    latent = math.sqrt(1 - params.region_share) * personal + math.sqrt(params.region_share) * tables.region[region]
    activity = np.exp(params.activity_sd * rng.standard_normal(n))
    taste = taste_rng.standard_normal((n, len(TEXTURES)))
    # centred: a preference between textures, not a conversion bias; rescaled to unit variance
    taste = (taste - taste.mean(1, keepdims=True)) * math.sqrt(len(TEXTURES) / (len(TEXTURES) - 1))
    return _Users(
        latent=latent.astype(np.float32),
        region=region,
        age=rng.integers(18, 76, n).astype(np.int64),
        click_bias=params.user_click_sd * rng.standard_normal(n),
        rating_bias=params.user_rating_sd * rng.standard_normal(n),
        texture_taste=taste,
        activity=activity,
        arrived_at=np.full(n, params.start_s, dtype=np.int64),
    )


def _draw_items(rng: np.random.Generator, quality_rng: np.random.Generator, n: int, tables: _Tables, params: SynthParams) -> _Items:
    """Item latents from topic, visual attributes and residual; popularity, price, creation time, quality."""
    topic = rng.integers(0, len(TOPICS), n)
    hue = rng.random(n)
    texture = rng.integers(0, len(TEXTURES), n)
    hue_part = np.cos(2 * np.pi * hue)[:, None] * tables.hue_cos + np.sin(2 * np.pi * hue)[:, None] * tables.hue_sin
    visual = (hue_part + tables.texture[texture]) / math.sqrt(2)  # unit variance per dim
    content = math.sqrt(params.topic_share) * tables.topic[topic] + math.sqrt(params.visual_share) * visual
    latent = content + math.sqrt(params.residual_share) * rng.standard_normal((n, params.latent_dim))
    created_at = _arrival_times(rng, n, params.new_item_fraction, params)
    price = np.round(np.exp(params.log_price_mean + params.log_price_sd * rng.standard_normal(n)), 2)
    grades = len(QUALITY_WORDS)
    quality_grade = quality_rng.integers(0, grades, n)
    grade_sd = math.sqrt((grades**2 - 1) / 12)  # sd of a uniform grade
    return _Items(
        latent=latent.astype(np.float32),
        content_latent=content.astype(np.float32),
        topic=topic,
        hue=hue,
        texture=texture,
        lightness=rng.uniform(0.55, 0.95, n),
        angle=rng.uniform(0, np.pi, n),
        popularity=rng.standard_normal(n),
        price=np.maximum(price, 0.01),
        created_at=created_at,
        quality_grade=quality_grade,
        quality=(quality_grade - (grades - 1) / 2) / grade_sd,
    )


def _arrival_times(rng: np.random.Generator, n: int, new_fraction: float, params: SynthParams) -> np.ndarray:
    """(n,) int64 unix s: a ``new_fraction`` share arrives uniformly over the span, the rest up to a year before it.

    At least one row exists before the span starts, so the first impression has something to draw.
    """
    n_new = min(int(round(new_fraction * n)), n - 1)
    is_new = np.zeros(n, dtype=bool)
    is_new[rng.permutation(n)[:n_new]] = True
    start, span_s = params.start_s, params.span_days * DAY_S
    return np.where(is_new, start + rng.integers(0, span_s, n), start - rng.integers(1, 365 * DAY_S, n)).astype(np.int64)


def item_text(
    rng: np.random.Generator, topic: np.ndarray, params: SynthParams = SynthParams(), quality_grade: np.ndarray | None = None
) -> pl.Series:
    """Title + description per item: topic nouns mixed with noise words, and words of the item's quality grade.

    ``quality_grade`` (ints into ``QUALITY_WORDS``): ``params.quality_words`` words of the grade
    are inserted at random places in the description, drawn last, so the other words are those
    of a text without them; None: no quality words.
    """
    n = len(topic)
    per_grade = len(QUALITY_WORDS[0])
    vocab = pl.Series(
        [*ADJECTIVES, *NOISE_WORDS, *(w for t in TOPICS for w in TOPIC_WORDS[t]), *(w for g in QUALITY_WORDS for w in g)]
    )
    noise0, topic0 = len(ADJECTIVES), len(ADJECTIVES) + len(NOISE_WORDS)
    quality0 = topic0 + len(TOPICS) * WORDS_PER_TOPIC

    def topic_word(of_topic: np.ndarray) -> np.ndarray:
        return topic0 + of_topic * WORDS_PER_TOPIC + rng.integers(0, WORDS_PER_TOPIC, len(of_topic))

    def noise_word() -> np.ndarray:
        return noise0 + rng.integers(0, len(NOISE_WORDS), n)

    title = [rng.integers(0, len(ADJECTIVES), n), topic_word(topic), topic_word(topic)]
    description = [
        np.where(rng.random(n) < params.topic_word_rate, topic_word(topic), noise_word())
        for _ in range(DESCRIPTION_WORDS)
    ]
    other_topic = (topic + rng.integers(1, len(TOPICS), n)) % len(TOPICS)
    slot = rng.integers(0, DESCRIPTION_WORDS, n)
    distract = rng.random(n) < params.distractor_rate
    for j, column in enumerate(description):  # one distractor word of another topic, at a random slot
        description[j] = np.where(distract & (slot == j), topic_word(other_topic), column)
    if quality_grade is not None and params.quality_words > 0:
        k = params.quality_words
        quality = quality0 + quality_grade[:, None] * per_grade + rng.integers(0, per_grade, (n, k))  # (n, k)
        length = DESCRIPTION_WORDS + k
        is_quality = np.zeros((n, length), dtype=bool)
        np.put_along_axis(is_quality, np.argsort(rng.random((n, length)), axis=1)[:, :k], True, axis=1)  # k distinct places
        rank = np.where(is_quality, np.cumsum(is_quality, axis=1) - 1, np.cumsum(~is_quality, axis=1) - 1)  # position among its kind
        ordered = np.where(is_quality, np.take_along_axis(quality, np.minimum(rank, k - 1), axis=1),
                           np.take_along_axis(np.stack(description, axis=1), np.minimum(rank, DESCRIPTION_WORDS - 1), axis=1))  # fmt: skip
        description = list(ordered.T)
    words = pl.DataFrame({f"w{j}": vocab[idx] for j, idx in enumerate(title + description)})
    title_expr = pl.concat_str([pl.col(f"w{j}") for j in range(len(title))], separator=" ")
    description_expr = pl.concat_str([pl.col(f"w{j}") for j in range(len(title), words.width)], separator=" ")
    text = pl.concat_str([title_expr, pl.lit(". "), description_expr, pl.lit(".")]).alias("text")
    return words.select(text).to_series()


def render_images(
    hue: np.ndarray, texture: np.ndarray, lightness: np.ndarray, angle: np.ndarray, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Item pictures, (B, size, size, 3) uint8: one dominant hue, a texture in a darker shade of it."""
    base = _hsv_to_rgb(hue, np.full_like(hue, 0.75), lightness)  # (B, 3) in [0, 1]
    shade = base * 0.45
    axis = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(axis, axis, indexing="ij")  # (S, S)
    along = x[None] * np.cos(angle)[:, None, None] + y[None] * np.sin(angle)[:, None, None]
    stripes = (along * 6) % 1 < 0.5
    cell_x, cell_y = (x * 5) % 1 - 0.5, (y * 5) % 1 - 0.5
    dots = np.broadcast_to(cell_x**2 + cell_y**2 < 0.3**2, stripes.shape)
    checker = np.broadcast_to((np.floor(x * 4) + np.floor(y * 4)) % 2 == 1, stripes.shape)
    kind = texture[:, None, None]
    pattern = ((kind == 1) & stripes) | ((kind == 2) & dots) | ((kind == 3) & checker)  # (B, S, S); plain: none
    picture = np.where(pattern[..., None], shade[:, None, None, :], base[:, None, None, :])
    picture = picture * 255 + rng.normal(0, 4, picture.shape)
    return np.clip(np.rint(picture), 0, 255).astype(np.uint8)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, all in [0, 1]; returns (n, 3)."""
    sector = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack(
        [np.stack(c, axis=-1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], axis=0
    )  # (6, n, 3)
    return table[sector, np.arange(len(h))]


def _write_images(out: Path, draw: _Items, seed: int, params: SynthParams, batch: int = 512) -> None:
    """Render and save ``images/i<k>.png`` for every item, in batches."""
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    n = len(draw.hue)
    with tqdm(total=n, desc="synth images", unit="img", leave=False) as bar:
        for lo in range(0, n, batch):
            hi = min(lo + batch, n)
            pictures = render_images(
                draw.hue[lo:hi], draw.texture[lo:hi], draw.lightness[lo:hi], draw.angle[lo:hi],
                params.image_size, np.random.default_rng([seed, 5, lo]),
            )  # fmt: skip
            for offset, picture in enumerate(pictures):  # one file per item: the format is the point
                Image.fromarray(picture).save(folder / f"i{lo + offset}.png", format="PNG")
            bar.update(hi - lo)


def _truth_items(item_ids: pl.Series, draw: _Items) -> pl.DataFrame:
    """Each item's attributes as the generator drew them: topic, visual attributes, quality, price, popularity, latents."""
    return pl.DataFrame(
        {
            "item_id": item_ids,
            "topic": pl.Series(np.array(TOPICS))[draw.topic],
            "hue": draw.hue,
            "texture": pl.Series(np.array(TEXTURES))[draw.texture],
            "lightness": draw.lightness,
            "quality_grade": draw.quality_grade,  # 0 worst .. 4 best: which row of QUALITY_WORDS the text draws from
            "quality": draw.quality,
            "price": draw.price,
            "popularity": draw.popularity,
            "created_at": draw.created_at,
            "latent": draw.latent,
            "content_latent": draw.content_latent,
        }
    )


def _truth_users(user_ids: pl.Series, draw: _Users) -> pl.DataFrame:
    """Each user's hidden attributes: latent vector, click and rating biases, taste per texture (``TEXTURES`` order)."""
    return pl.DataFrame(
        {
            "user_id": user_ids,
            "latent": draw.latent,
            "click_bias": draw.click_bias,
            "rating_bias": draw.rating_bias,
            "texture_taste": draw.texture_taste,
        }
    )


@dataclass(frozen=True)
class _ArrivalPool:
    """Rows drawn by weight among those arrived by a time: items by creation, users by arrival."""

    order: np.ndarray  # (N,) row indices by arrival time (stable)
    arrived_sorted: np.ndarray  # (N,) arrival times in that order
    weight_cdf: np.ndarray  # (N,) cumulative weight in that order

    @classmethod
    def of(cls, arrived_at: np.ndarray, weight: np.ndarray) -> _ArrivalPool:
        order = np.argsort(arrived_at, kind="stable")
        return cls(order=order, arrived_sorted=arrived_at[order], weight_cdf=np.cumsum(weight[order]))

    def draw(self, rng: np.random.Generator, timestamp: np.ndarray) -> np.ndarray:
        """One row index per timestamp, among the rows arrived at or before it."""
        available = np.searchsorted(self.arrived_sorted, timestamp, "right")
        return self.order[_draw_from_cdf(rng, self.weight_cdf, available)]


def _impressions(
    key: tuple[int, ...], n: int, start_s: int, end_s: int, users: _Users, items: _Items, tables: _Tables, params: SynthParams
) -> dict[str, np.ndarray]:
    """Draw ``n`` impressions in ``[start_s, end_s)`` in time order, chunk by chunk, with true probabilities and labels.

    The users' latents are taken as given (the stream passes each day's); users and items are
    drawn among those arrived by the impression's time. Random streams ``[*key, 6]`` (timestamps)
    and ``[*key, 7, chunk start]``: the one-shot dataset's key is ``(seed,)``.
    """
    timestamp = np.sort(np.random.default_rng([*key, 6]).integers(start_s, end_s, n))
    user_pool = _ArrivalPool.of(users.arrived_at, users.activity)
    item_pool = _ArrivalPool.of(items.created_at, np.exp(params.popularity_sd * items.popularity))
    rows = {
        "timestamp": timestamp,
        "user": np.empty(n, np.int32),
        "item": np.empty(n, np.int32),
        "p_click": np.empty(n),
        "p_conversion": np.empty(n),
        "rating_mean": np.empty(n),
        "p_click_content": np.empty(n),
        "click": np.empty(n, np.int8),
        "conversion": np.empty(n, np.int8),
        "rating": np.empty(n, np.float32),
    }
    with tqdm(total=n, desc="synth impressions", unit="row", unit_scale=True, leave=False) as bar:
        for lo in range(0, n, params.chunk_rows):
            hi = min(lo + params.chunk_rows, n)
            rng = np.random.default_rng([*key, 7, lo])
            user = user_pool.draw(rng, timestamp[lo:hi])
            item = item_pool.draw(rng, timestamp[lo:hi])
            chunk = {"user": user, "item": item, **_oracle(user, item, users, items, tables, params)}
            chunk["click"] = rng.random(hi - lo) < chunk["p_click"]
            chunk["conversion"] = chunk["click"] & (rng.random(hi - lo) < chunk["p_conversion"])
            stars = 1 + rng.binomial(4, (chunk["rating_mean"] - 1) / 4)  # mean is exactly rating_mean
            chunk["rating"] = np.where(chunk["click"], stars, np.nan)
            for name, values in chunk.items():
                rows[name][lo:hi] = values
            bar.update(hi - lo)
    return rows


def _draw_from_cdf(rng: np.random.Generator, cdf: np.ndarray, prefix: np.ndarray) -> np.ndarray:
    """Per row, an index below ``prefix[row]`` drawn with probability proportional to its weight."""
    picked = np.searchsorted(cdf, rng.random(len(prefix)) * cdf[prefix - 1], "right")
    return np.minimum(picked, prefix - 1)  # guards the float edge where u * total == total


def _oracle(user: np.ndarray, item: np.ndarray, users: _Users, items: _Items, tables: _Tables, params: SynthParams) -> dict[str, np.ndarray]:
    """The true p_click, p_conversion (given click) and rating_mean of (user, item) rows, and p_click_content.

    ``p_click_content``: the click probability as seen by a model that knows the user but sees
    the item only through its text and image: the item latent's residual and its popularity
    (which only interactions reveal) are left out - the ceiling for items never seen in training.
    """
    user_latent = users.latent[user]

    def affinity(weights: np.ndarray, item_latent: np.ndarray = items.latent) -> np.ndarray:  # w . (u * v), unit variance
        return np.einsum("nd,nd->n", user_latent * weights.astype(np.float32), item_latent[item]).astype(np.float64)

    price_z = (np.log(items.price[item]) - params.log_price_mean) / params.log_price_sd
    age_z = (users.age[user] - 46.5) / 16.5
    click_logit = (
        params.click_bias
        + params.click_scale * affinity(tables.w_click)
        + params.popularity_click * items.popularity[item]
        + users.click_bias[user]
    )
    content_click_logit = params.click_bias + params.click_scale * affinity(tables.w_click, items.content_latent) + users.click_bias[user]
    conversion_logit = (
        params.conversion_bias
        + params.conversion_scale * affinity(tables.w_conversion)
        + params.price_conversion * price_z
        + params.age_conversion * age_z
        + params.texture_conversion * users.texture_taste[user, items.texture[item]]
        + params.quality_conversion * items.quality[item]
    )
    rating_logit = params.rating_bias + params.rating_scale * affinity(tables.w_rating) + users.rating_bias[user]
    return {
        "p_click": _sigmoid(click_logit),
        "p_conversion": _sigmoid(conversion_logit),
        "rating_mean": 1 + 4 * _sigmoid(rating_logit),
        "p_click_content": _sigmoid(content_click_logit),
    }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _label_stats(rows: dict[str, np.ndarray], items: _Items) -> dict[str, Any]:
    """Base rates, oracle AUCs (the ceiling a model is compared with; <= ~2M rows) and cold items in the last 10%."""
    click = rows["click"].astype(bool)
    conversion = rows["conversion"].astype(bool)
    n = len(click)
    cut = int(0.9 * n)  # rows are in time order
    seen_early = np.zeros(len(items.hue), dtype=bool)
    seen_early[rows["item"][:cut]] = True
    seen_late = np.zeros(len(items.hue), dtype=bool)
    seen_late[rows["item"][cut:]] = True
    late_rows_cold = float(np.mean(~seen_early[rows["item"][cut:]])) if n > cut else 0.0
    stride = max(1, n // AUC_MAX_ROWS)  # every stride-th row: AUCs of 10M rows cost more than they tell
    sub_click = click[::stride]
    return {
        "ctr": round(float(click.mean()), 4),
        "cvr_given_click": round(float(conversion[click].mean()), 4) if click.any() else None,
        "mean_rating": round(float(np.nanmean(rows["rating"])), 4) if click.any() else None,
        "oracle_click_auc": _auc(rows["p_click"][::stride], click[::stride]),
        "oracle_conversion_auc": _auc(rows["p_conversion"][::stride][sub_click], conversion[::stride][sub_click]),
        "oracle_ctcvr_auc": _auc((rows["p_click"] * rows["p_conversion"])[::stride], conversion[::stride]),
        "oracle_auc_rows": int(sub_click.size),
        "items_impressed": int(np.count_nonzero(seen_early | seen_late)),
        "cold_items_last_10pct": int(np.count_nonzero(seen_late & ~seen_early)),
        "cold_rows_share_last_10pct": round(late_rows_cold, 4),
    }


def _auc(score: np.ndarray, label: np.ndarray) -> float | None:
    """``recsys.metrics.auc`` rounded for truth.json; None (JSON null) when one class is absent."""
    value = auc(label, score)
    return round(value, 4) if math.isfinite(value) else None
