"""Typed, frozen run configuration: built once from TOML + ``--set`` overrides, validated at the edge.

Every section is a frozen pydantic model: unknown keys are errors, values are checked against the
annotations and the ``Field`` limits, and nothing deeper in the code reads raw dicts. ``load_config``
turns pydantic's errors into a ``ConfigError`` that names the dotted key and where its value came from.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, ValidationInfo, field_validator, model_validator

from recsys.errors import ConfigError


class _Section(BaseModel):
    """A frozen config section that also reads ``--set`` text: "none" for None, "a,b" for a tuple."""

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

    @field_validator("*", mode="before")
    @classmethod
    def _read_text(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, str) and value.lower() in ("none", "null", "") and type(None) in get_args(annotation):
            return None  # TOML has no null: to_toml writes None as "none"
        if isinstance(value, str) and get_origin(annotation) is tuple:
            value = [item.strip() for item in value.split(",") if item.strip()]
        items = value if isinstance(value, (list, tuple)) else [value]
        if annotation is not bool and bool not in get_args(annotation) and any(isinstance(item, bool) for item in items):
            raise ValueError("true/false is only valid for on/off keys")  # pydantic would read True as 1
        return value


class DataConfig(_Section):
    """Validation, splitting, history and negative sampling (``recsys prepare``)."""

    unknown_items: Literal["error", "drop"] = "error"  # interactions naming items absent from the catalogue
    rating_min: float = 1.0
    rating_max: float = 5.0
    conversion_from_rating: float | None = 4.0  # derive conversion = rating >= this when no conversion column
    split: Literal["auto", "given", "temporal", "leave_last"] = "auto"  # auto: given if a split column, else temporal
    valid_fraction: float = Field(0.1, ge=0, lt=1)  # temporal: share of events (by time) in valid
    test_fraction: float = Field(0.1, gt=0, lt=1)
    leave_last_n: int = 1  # leave_last: the last n events of each user go to test, the n before to valid
    history_len: int = Field(100, ge=1)  # L: item indices strictly before the event (the user tower pools them all; the set term draws its states from up to L train clicks); 100 against 50: ML-100K u1 towers' NDCG@20 +0.010 to +0.016 on 3 seeds, u2 +0.012, recall@20 within 0.004; synthetic (3 seeds) click and cold-item efficiency up, recall@20 -0.006 (README)
    negatives_per_positive: int = Field(4, ge=0)  # only when the data has no impressions (no click column)
    negative_alpha: float = 0.75  # sampling probability ∝ popularity^alpha
    seed: int = 0

    @model_validator(mode="after")
    def _ranges_are_consistent(self) -> DataConfig:
        if self.rating_min >= self.rating_max:
            raise ValueError(f"data.rating_min ({self.rating_min}) must be below data.rating_max ({self.rating_max})")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError(f"data.valid_fraction + data.test_fraction must be below 1 (got {self.valid_fraction} + {self.test_fraction})")
        return self


class EmbedConfig(_Section):
    """Item content encoders (``recsys embed``)."""

    text_model: str = "minilm"  # "minilm" (bundled all-MiniLM-L6-v2), a HF id or a local path; "none" disables
    image_model: str = "builtin"  # "builtin" (weight-free), "hf:<id or path>", or "none"
    batch_size: int = 64
    max_length: int = 128  # tokens; longer text is truncated and counted
    bf16: bool = True  # use bf16 autocast on CPU when it keeps cosine >= 0.999 against fp32 and is faster here
    int8: bool = False  # also try the text encoder with int8 dynamically quantised Linear layers; kept when every calibration item keeps cosine >= 0.99 to fp32 and it is faster (MiniLM: 0.955, refused)
    threads: int = 0  # torch intra-op threads while encoding (restored afterwards); 0 = all cores
    cache_dir: str = ""  # "" = RUN/content/cache
    align: bool = False  # learn contrastive text<->image projections so a missing modality can be imputed
    image_size: int = 64  # side of the square the built-in image encoder resizes to


class ModelConfig(_Section):
    """Towers, fusion and the multi-task ranker."""

    dim: int = Field(64, ge=1)  # d: output of both towers
    embedding_dim: int = Field(64, ge=1)  # TorchRec table dimension
    use_text: bool = True
    use_image: bool = True
    fusion: Literal["concat", "gated"] = "concat"
    modality_dropout: float = Field(0.1, ge=0, lt=1)
    id_dropout: float = Field(0.1, ge=0, lt=1)  # share of training rows whose item id embedding is hidden, so content must carry cold items
    ranker: Literal["mmoe", "shared_bottom", "single_task"] = "mmoe"
    experts: int = Field(4, ge=1)
    expert_dim: int = 64
    tower_dim: int = 32
    tasks: tuple[Literal["click", "conversion", "rating"], ...] = ("click", "conversion", "rating")  # heads wanted; ones without labels switch off
    ranker_input: Literal["features", "towers"] = "features"  # features: ids, side features, content, target attention and the towers; towers: [u, v, u*v] only
    ranker_stop_gradient: bool = False  # true: the ranker's loss does not reach the tower vectors (it still trains the tables it reads)
    ranker_content_dim: int = Field(32, ge=1)  # the candidate's projected text + image, as the ranker (and the service) keeps it
    ranker_id_dropout: float = Field(0.3, ge=0, lt=1)  # share of training rows whose candidate id embedding the ranker does not see (on top of id_dropout)
    attention: Literal["mlp", "dot"] = "dot"  # the target attention's scoring: the scaled dot product h.q/sqrt(E), or DIN's MLP over [h, q, h*q, h-q] (recsys.attention); dot: equal on ML-100K u1, mixed on 3 synthetic seeds (click eff. -0.013, CVR +0.027), a quarter of the attention's training cost (README)
    attention_len: int = Field(20, ge=1)  # the target attention reads the last this many history items (the user tower pools all of data.history_len)
    cross_dim: int = Field(0, ge=0)  # the ranker also reads k products (P_u [u, user_part]) * (P_i [v, item_part]): a learned rank-k bilinear form between the user's and the candidate's features (e.g. a user's taste for a content attribute), which an MLP over concatenated inputs learns poorly; 0 = off (default: k = 16 lifts the synthetic heads, mean click efficiency 0.753 -> 0.791 over three seeds, but costs ML-100K u1's RMSE, 0.9021 -> 0.9078 and 0.9057 -> 0.9152 in two paired runs; README, "Synthetic data")
    content_history: bool = True  # the user tower also reads the mean content vector of the history, so items without a trained id row (cold, added live) count
    item_bias: bool = False  # the item tower also gives a retrieval bias b (from the item's id and content), score = (u . v + b) / T, carried as one more coordinate ([v, b] against [u, 1]); synthetic: towers' recall@20 +4.5% and cold-item click +0.08 efficiency over 3 seeds, ML-100K u1 unchanged, slower click learning on tiny data (README)
    history_id_dropout: float = Field(0.3, ge=0, lt=1)  # share of history entries whose id the user tower's bag does not see in training, so content carries them (0.3 beat 0 on the synthetic heads, cold items and ML-100K u1)
    popularity_prior: str = "valid"  # retrieval adds beta * log(1 + the item's train clicks) to the towers' score (after training; the ranker's input keeps the trained score): "off", "valid" (beta of popularity_prior_grid with the best valid recall, valid measured like test), or a number
    popularity_prior_grid: tuple[float, ...] = (0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3)

    @field_validator("popularity_prior")
    @classmethod
    def _prior_is_known(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("off", "valid"):
            return value
        try:
            beta = float(value)
        except ValueError:
            beta = -1.0
        if not (beta >= 0 and beta < float("inf")):
            raise ValueError(f"model.popularity_prior must be \"off\", \"valid\" or a number >= 0, got {value!r}")
        return repr(beta)

    @field_validator("popularity_prior_grid")
    @classmethod
    def _grid_is_non_negative(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or any(not (beta >= 0 and beta < float("inf")) for beta in value):
            raise ValueError(f"model.popularity_prior_grid must be one or more numbers >= 0, got {value!r}")
        return value


class TrainConfig(_Section):
    """The training job."""

    epochs: int = Field(20, ge=1)  # an upper bound: early stopping (patience) ends most runs sooner
    batch_size: int = Field(1024, ge=2)
    lr: float = 1e-3  # dense parameters (Adam)
    embedding_lr: float = 0.01  # fused row-wise Adagrad on the TorchRec tables (0.05: valid AUC peaked at epoch 3)
    weight_decay: float = 0.0
    temperature: float = Field(0.1, gt=0)  # in-batch softmax of the retrieval objective (0.1 beat 0.05 on ML-100K recall and on the synthetic heads)
    retrieval_weight: float = 1.0
    retrieval_negatives: Literal["clicked", "all_rows"] = "clicked"  # in-batch candidates: the clicked rows' items, or every row's item
    logq_correction: float = 1.0  # alpha in the in-batch logits u.v/T - alpha log q(item): 1 = full popularity correction, 0 = none
    retrieval_softmax: Literal["auto", "full", "sampled"] = "auto"  # full: every catalogue item is a candidate; sampled: in-batch + uniform; auto: full up to full_softmax_max_items
    full_softmax_max_items: int = Field(20_000, ge=0)
    uniform_negatives: int = Field(256, ge=0)  # sampled softmax: catalogue items drawn uniformly per batch (through the item tower, so cold and tail items are negatives too)
    future_positives: int = Field(0, ge=0)  # full softmax, one process: also a multinomial loss over each clicked row's next N train clicks of its user (strictly later: labels, never inputs); 200: towers' recall@20 +0.020 on ML-100K u1 and +0.021 on u2, but the synthetic heads' efficiency -0.02 to -0.08 over 3 seeds (README), hence 0 = off
    future_weight: float = Field(1.0, ge=0)  # weight of that multinomial term beside the next-item softmax
    set_weight: Annotated[float, Field(ge=0)] | Literal["auto"] = "auto"  # full softmax, one process: also a user-level multinomial each step: each clicked user's state, built from a random part of their train clicks, scores the rest (train.set_holdout of them; Mult-DAE's task, as test asks the state at the end of the known data for held-out items); train clicks only, as inputs and labels; auto = AUTO_SET_WEIGHT of training.epochs on data without impressions, else 0 (README: ML-100K u1 towers' recall@20 0.240 -> 0.288, the synthetic heads lower); 0 = off
    set_holdout: float = Field(0.5, gt=0, lt=1)  # the share of a user's train clicks that the set term holds out as its labels (the rest, up to data.history_len, is the state's history); 0.5 against 0.2: ML-100K u1 (2 seeds) and u2 better click AUC and recall@20, RMSE equal or better (README)
    selection_recall_k: int = Field(20, ge=1)  # model selection also weighs valid recall@K of the towers (0 rows: losses only)
    selection_recall_rows: int = Field(2000, ge=0)  # clicked valid rows that measure it (a fixed sample)
    selection_recall: Literal["next_item", "user_state"] = "next_item"  # next_item: each clicked valid row scored from its own history; user_state (one process): each user's state at the end of train against their valid clicks, as test is measured (at most selection_recall_rows users)
    loss_weights: Literal["static", "uncertainty", "gradnorm", "dwa"] = "static"  # learned or performance-based weights cover the task losses, not the retrieval term
    click_weight: float = 1.0
    conversion_weight: float = 1.0
    rating_weight: float = 1.0
    cvr_on_clicks: float = 3.0  # weight of a direct p_cvr loss on clicked rows, added to the ESMM ctcvr loss (0 = pure ESMM; 3 beat 1 on synthetic CVR efficiency, 0.892 vs 0.875)
    patience: int = 3  # early stopping: epochs without a better validation score
    plateau_lr_factor: float = 0.5  # after an epoch that does not improve the validation score, dense lr *= this (1 = constant lr)
    checkpoint_every_steps: int = Field(0, ge=0)  # one process: also checkpoint every this many batches within an epoch, so --resume continues mid-epoch (0 = at the end of each epoch only)
    refit: bool = False  # one process: after model selection, train a fresh model on train + valid for the selected number of epochs (the same seed and lr per epoch) and keep that one
    rating_calibration: Literal["valid", "off"] = "valid"  # after training: ratings shrunk toward the train mean, r -> m + a (r - m), a fitted on the valid split's ratings (least squares; training.calibration); u1 RMSE in the README
    average_weights: bool | Literal["auto"] = "auto"  # one process: also average the end-of-epoch weights from the first plateau on (SWA) and keep the mean when it validates better; auto = on unless train.refit, --nproc > 1 or a model state over training.epochs.AVERAGE_AUTO_MAX_MB (README: kept on 4 of 6 runs, better heads and RMSE where kept)
    seed: int = 0
    nproc: int = Field(1, ge=1)
    sharding: Literal["auto", "data_parallel", "table_wise", "column_wise", "row_wise"] = "auto"
    memory_budget_mb: float = Field(4096.0, ge=0)  # a train split (each rank's part with --nproc N) whose rows (36 bytes + 4 per history item each, training.data.bytes_per_row) exceed this is read in chunks (training.data.StreamedSplit); 0 = always in memory
    init_from: str = ""  # a run directory whose model warm-starts this one (set by `recsys update`; its tables grow to this run's vocabularies)


class IndexConfig(_Section):
    """FAISS index of the item tower."""

    exact_below: int = 100_000  # catalogues smaller than this use exact inner-product search
    kind: Literal["auto", "flat", "hnsw", "ivf"] = "auto"  # auto: flat below exact_below, else ivf
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_search: int = 128  # starting point; raised at build time until target_recall is met
    hnsw_ef_construction: int = 80
    ivf_nlist: int = 0  # inverted lists; 0 = about 4 * sqrt(items), a power of two
    ivf_nprobe: int = 0  # lists scanned per query; 0 = the smallest that meets target_recall
    target_recall: float = Field(0.95, gt=0, le=1)  # ANN recall@100 against exact search, measured at build time
    recall_queries: int = Field(500, ge=1)  # sample of queries for that measurement


class ServeConfig(_Section):
    """Retrieve -> rank -> top-k."""

    candidates: int = Field(100, ge=1)  # FAISS top-N handed to the ranker (with the co-occurrence source, 100 served ML-100K u1 and u2 as well as 300, at a third of the ranking work)
    max_k: int = Field(100, ge=1)
    blend_click: float = 1.0  # final score = w_click*p_click + w_ctcvr*p_ctcvr + w_rating*rating_01
    blend_ctcvr: float = 1.0
    blend_rating: float = 0.5
    blend_retrieval: float = 1.0  # weight of the towers' cosine, mapped to [0, 1]: the first stage's own order stays part of the served one
    # The co-occurrence source and its blend weight: on ML-100K u1 served recall@20 0.182 -> 0.258 with cosine, 0.309 with EASE (chosen there), u2 in the README.
    blend_cooccurrence: float = 10.0  # item_item = cosine: weight of a candidate's mean co-occurrence cosine to the user's clicked items (recsys.candidates)
    blend_ease: float = 1000.0  # item_item = ease: weight of a candidate's EASE score, summed over the user's clicked items and divided by their number
    cooccurrence_candidates: int = Field(50, ge=0)  # quota of the item-to-item co-occurrence source, on top of the towers' `candidates` (0 = off)
    popular_candidates: int = Field(0, ge=0)  # quota of the most-clicked unseen items, on top of the others (0 = off; +0.000 on ML-100K u1)
    cooccurrence_recent: int = Field(0, ge=0)  # the co-occurrence source reads the user's last this many distinct clicked items (0 = all: ML-100K u1 EASE 0.309 vs 0.293 at 50)
    cooccurrence_neighbours: int = Field(50, ge=1)  # item_item = cosine: each item keeps this many most co-clicked items
    ease_neighbours: int = Field(500, ge=1)  # item_item = ease: each item keeps this many weights largest in magnitude (ML-100K u1: 200 -> 0.304, 500 -> 0.309 served recall@20)
    item_item: Literal["auto", "cosine", "ease"] = "auto"  # the co-occurrence source's item-item weights: cosine of co-click sets, or EASE's closed form; auto: ease up to ease_max_items
    ease_lambda: float = Field(300.0, gt=0)  # item_item = ease: L2 weight lambda of B = I - P diag(1/diag P), P = (X^T X + lambda I)^-1
    ease_max_items: int = Field(5_000, ge=1)  # item_item = auto: EASE up to this many items (the service inverts an items x items matrix at load, 16 bytes each at the peak)
    threads: int = 1  # torch and FAISS threads per request (requests run concurrently); 0 = library default
    batch_max: int = Field(32, ge=1)  # concurrent /recommend requests run as one batch (serving.batcher) of at most this many; 1 = each on its own
    batch_workers: int = Field(2, ge=1)  # threads that run batches (serving.batcher): with 2, a second core does model work while one thread holds the GIL (1M items: see README)
    rank_cache_mb: float = Field(256.0, ge=0)  # keep each catalogue item's share of the ranker's first layer (model.item_first_layer: 4 (H + 2 + model.cross_dim) bytes an item, about 1.1 KB) when the catalogue's fits in this; 0 = off
    batch_wait_ms: float = Field(0.0, ge=0)  # how long a batch waits for more requests (0: it takes those already waiting, so a lone request never waits)
    access_log: bool = True  # one JSON line per request on stderr
    runs_root: str = ""  # /admin/reload only loads run directories under this one; "" = the parent of the served run
    max_body_bytes: int = Field(16 * 2**20, ge=1024)  # request bodies above this are refused (413) before they are read whole
    write_timeout_s: float = Field(30.0, gt=0)  # POST /items waits this long for a reload or another add, then answers 503
    follow_poll_s: float = Field(1.0, gt=0)  # `recsys serve --follow DIR`: how often DIR/published.json is looked at
    live_users: int = Field(100_000, ge=1)  # users whose POST /events clicks are held in memory (least recently active evicted; their events stay in RUN/events)
    events_max_future_s: int = Field(86_400, ge=0)  # POST /events refuses timestamps further than this past the service's clock
    events_segment_rows: int = Field(100_000, ge=1)  # RUN/events: the write-ahead log is rolled into a parquet segment every this many events

    def item_item_blend(self, kind: str) -> float:
        """The blend weight of the co-occurrence source's score for a table of ``kind`` ("cosine" or "ease")."""
        return self.blend_ease if kind == "ease" else self.blend_cooccurrence


class EvalConfig(_Section):
    """Evaluation and reports."""

    ks: tuple[PositiveInt, ...] = (10, 20, 50, 100)
    bootstrap: int = 200
    max_eval_users: int = 0  # 0 = all test users in the retrieval metrics
    exclude: Literal["train_valid", "train"] = "train_valid"  # items never ranked for a user: their train and valid clicks, or (as MMRec and most papers) train only
    baseline_mf: bool = True  # also train BPR-MF / biased MF and report them under "baseline_mf"
    baseline_max_samples: int = Field(20_000_000, ge=1)  # BPR-MF / biased MF: at most this many sample steps (fewer epochs, then one epoch on a sample; said in the report)
    baselines: tuple[Literal["most_popular", "item_knn", "ease", "bpr_mf"], ...] = ("most_popular", "item_knn", "ease", "bpr_mf")  # ranked with the model's retrieval protocol under "baselines" ("" = none)
    knn_neighbours: int = Field(50, ge=1)  # item_knn: most similar items each item keeps
    knn_max_items: int = Field(20_000, ge=1)  # item_knn: skipped above this many catalogue items (dense items x items weights, 4 bytes each)
    ease_lambda: float = Field(300.0, gt=0)  # ease: L2 weight lambda in B = I - P diag(1/diag P), P = (X^T X + lambda I)^-1
    ease_max_items: int = Field(20_000, ge=1)  # ease: skipped above this many catalogue items (inverts a dense items x items matrix, 16 bytes each at the peak)


class UpdateConfig(_Section):
    """``recsys update``: warm-start a trained run on new logs."""

    replay: float = Field(0.2, ge=0, le=1)  # share of BASE's rows trained on again with the new ones (against forgetting); the rest are history only
    epochs: int = Field(1, ge=0)  # epochs of the update's training (0 = train.epochs); 1: on the drifting stream of benchmarks/update.py one epoch matched a full retrain, 5 overfit the day and were refused by the gate
    gate: bool = True  # compare the update with BASE on the new test rows (training.gate) and refuse it when significantly worse
    max_drop: str = ""  # the gate's tolerances, "click.auc=0.002,retrieval.recall@20=0.005" ("" = the gate's defaults)
    follow_min_events: int = Field(1, ge=1)  # --follow: a new generation starts once this many events past the live run's data are logged
    follow_every_s: float = Field(10.0, ge=0)  # --follow: at least this long between the starts of two generations
    follow_poll_s: float = Field(1.0, gt=0)  # --follow: how often the event log is looked at


class Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    data: DataConfig = DataConfig()
    embed: EmbedConfig = EmbedConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    index: IndexConfig = IndexConfig()
    serve: ServeConfig = ServeConfig()
    eval: EvalConfig = EvalConfig()
    update: UpdateConfig = UpdateConfig()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: section_dict(getattr(self, name)) for name in type(self).model_fields}

    def digest(self) -> str:
        """Stable hash of the resolved config (for the manifest and caches)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **overrides: str) -> Config:
        """A copy with dotted-key overrides applied (``{"train.epochs": "1"}``)."""
        return load_config(None, [f"{k}={v}" for k, v in overrides.items()], base=self)


def section_dict(section: BaseModel) -> dict[str, Any]:
    """One config section as a JSON-able dict (tuples as lists): for hashes, model.json and TOML."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in section.model_dump().items()}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: Config | None = None) -> Config:
    """Build the config: defaults (or ``base``) <- TOML file <- ``key=value`` overrides."""
    values = (base or Config()).model_dump()  # {section: {key: value}}
    sources: dict[str, str] = {}  # dotted key -> the file or --set it came from

    def assign(section: str, key: str, value: Any, where: str) -> None:
        dotted = f"{section}.{key}"
        if section not in values:
            raise ConfigError(f"{where}: unknown config section {section!r} (known: {', '.join(values)})")
        if key not in values[section]:
            raise ConfigError(f"{where}: unknown config key {dotted!r} (known in [{section}]: {', '.join(values[section])})")
        values[section][key] = value
        sources[dotted] = where

    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for section, table in raw.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
            for key, value in table.items():
                assign(section, key, value, str(path))

    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.epochs=1")
        dotted, value = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        assign(section, key, value.strip(), f"--set {item!r}")

    try:
        return Config.model_validate(values)
    except ValidationError as exc:
        raise _config_error(exc, sources) from None


def _config_error(exc: ValidationError, sources: dict[str, str]) -> ConfigError:
    """Pydantic's errors, one line each, naming the dotted key and where its value came from."""
    lines = []
    for error in exc.errors():
        section, *rest = map(str, error["loc"])  # ("train", "epochs") or, for an item of a tuple, ("eval", "ks", "1")
        message = error["msg"].removeprefix("Value error, ")
        if rest:
            dotted = f"{section}.{rest[0]}"
            where = sources.get(dotted, "")
            line = f"config key {dotted!r}: {message} (got {error['input']!r})"
        else:  # a check across keys of one section; its message names them
            where = ", ".join(dict.fromkeys(w for k, w in sources.items() if k.startswith(f"{section}.")))
            line = message
        lines.append(f"{where}: {line}" if where else line)
    return ConfigError("\n".join(lines))


def to_toml(cfg: Config) -> str:
    """Render the resolved config as TOML (written to RUN/config.toml)."""
    lines: list[str] = []
    for section, table in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            if value is None:
                value = "none"  # TOML has no null; _Section reads "none" back as None
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)
