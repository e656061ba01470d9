"""Frame embeddings: the model behind the `embedding` curation column and similarity search.

A frame is embedded from its pixels alone (never its labels or scene attributes), as a unit
vector compared by cosine distance. Which model is deployment configuration (the workspace's
`embedding_model`), given here as a spec:

- `color_layout` (the default; offline, no learned weights): an 8x8 YCbCr colour layout and
  a 4x4 grid of gradient-orientation histograms, 256 numbers. It finds frames that look alike
  (night with night, a re-encoded copy next to its original); it knows nothing of objects, and
  it has no text tower. It needs no trained asset, so a fresh deployment's first batch fills
  the column.
- `clip:<folder>` (a copied OpenCLIP model folder: `open_clip_config.json` and its weights, as
  the Hugging Face hub holds them), `clip:<architecture>:<weights file>`, or
  `clip:<architecture>:<pretrained tag>` whose weights are already in the Hugging Face hub
  cache: OpenCLIP (`open_clip`), loaded from local files (nothing is downloaded here).
  The only model with a text tower (text search, modes defined by a text query).
- `detector:<state_dict path>[:<profile>]`: the backbone of one of this project's Faster R-CNN
  checkpoints (for example the base detector's `model.pt`), its FPN levels average-pooled.

The column records the model's label (with a digest of local weights) in its metadata; a run
under another model refuses to extend the column unless it is recomputed, as for
`person_bbox_area_pct`. Nothing here knows about Dagster or the table.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avperception_assets.discovery.vector_index import unit_rows
from avperception_assets.model import detector

COLOR_LAYOUT = "color_layout"
COLOR_LAYOUT_DIM = 256
FPN_CHANNELS = 256  # torchvision's FPN backbones: every level has 256 channels


class EmbeddingError(ValueError):
    """An embedding model that cannot be used as configured (the message says what to change)."""


@dataclass(frozen=True)
class EmbeddingModel:
    """A configured embedding model, resolved without loading it: `label` is what the column records."""

    kind: str  # color_layout | clip | detector
    label: str
    dim: int
    architecture: str | None = None
    weights: str | None = None  # a local file (a CLIP folder: None, its architecture names it)
    profile: str | None = None  # detector profile name

    @property
    def has_text_tower(self) -> bool:
        return self.kind == "clip"


def resolve(spec: str = COLOR_LAYOUT) -> EmbeddingModel:
    """The model `spec` names; fails clearly, naming what is missing, when its weights are not on
    this machine."""
    kind, _, rest = spec.partition(":")
    if kind == COLOR_LAYOUT and not rest:
        return EmbeddingModel(COLOR_LAYOUT, "color_layout:v1 (offline default, no learned weights)", COLOR_LAYOUT_DIM)
    if kind == "clip":
        return _resolve_clip(spec, rest)
    if kind == "detector":
        return _resolve_detector(spec, rest)
    raise EmbeddingError(f"embedding model {spec!r}: expected 'color_layout', 'clip:<model folder>', "
                         "'clip:<architecture>:<weights file or cached OpenCLIP tag>' or "
                         "'detector:<state_dict path>[:<profile>]'")


def _resolve_clip(spec: str, rest: str) -> EmbeddingModel:
    folder = Path(rest).expanduser()
    if folder.is_dir():
        return _resolve_clip_folder(spec, folder)
    architecture, _, weights = rest.partition(":")
    if not architecture or not weights:
        raise EmbeddingError(f"embedding model {spec!r}: expected 'clip:<architecture>:<weights>'")
    config = _open_clip().get_model_config(architecture)
    if config is None:
        raise EmbeddingError(f"embedding model {spec!r}: open_clip has no architecture {architecture!r}")
    path = Path(weights).expanduser()
    if path.is_file():
        label = f"clip:{architecture}:file:{path.name}@{detector.weights_digest(path)}"
        return EmbeddingModel("clip", label, config["embed_dim"], architecture, str(path.resolve()))
    cached = _cached_clip_weights(architecture, weights)
    if cached is None:
        raise EmbeddingError(
            f"embedding model {spec!r}: {weights!r} is neither a weights file nor an OpenCLIP pretrained tag "
            f"whose weights are in the Hugging Face hub cache ({_hub_cache()}); this machine downloads nothing. "
            "Copy the weights file here and name its path.")
    # open_clip gets the cached file's path, so it never asks the hub.
    return EmbeddingModel("clip", f"clip:{architecture}:{weights}", config["embed_dim"], architecture, cached)


def _resolve_clip_folder(spec: str, folder: Path) -> EmbeddingModel:
    open_clip = _open_clip()
    architecture = f"{open_clip.factory.LOCAL_DIR_PREFIX}{folder.resolve()}"
    if not (folder / "open_clip_config.json").is_file():
        raise EmbeddingError(f"embedding model {spec!r}: {folder} has no open_clip_config.json")
    weights = open_clip.factory._find_checkpoint_in_dir(folder)  # the file open_clip itself will load
    if weights is None:
        raise EmbeddingError(f"embedding model {spec!r}: {folder} has no weights file (*.safetensors, *.bin)")
    config = open_clip.get_model_config(architecture)
    label = f"clip:dir:{folder.name}@{detector.weights_digest(Path(weights))}"
    return EmbeddingModel("clip", label, config["embed_dim"], architecture)


def _resolve_detector(spec: str, rest: str) -> EmbeddingModel:
    path_text, _, profile_name = rest.partition(":")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise EmbeddingError(f"embedding model {spec!r}: no state_dict file at {path}")
    profile = detector.get_profile(profile_name or None)
    label = f"detector:{path.name}@{detector.weights_digest(path)}:{profile.architecture}"
    return EmbeddingModel("detector", label, FPN_CHANNELS, profile.architecture, str(path.resolve()), profile.name)


def _open_clip():
    import open_clip  # with timm and more: seconds to import, paid only where CLIP is configured

    return open_clip


def _hub_cache() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return HF_HUB_CACHE


def _cached_clip_weights(architecture: str, tag: str) -> str | None:
    """The local path of an OpenCLIP pretrained tag's weights if the hub cache holds them."""
    from huggingface_hub import try_to_load_from_cache

    config = _open_clip().get_pretrained_cfg(architecture, tag)
    repo = (config or {}).get("hf_hub", "").rstrip("/")
    if not repo:
        return None
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


# --- the offline default ---------------------------------------------------------------------


def _color_layout(image_bytes: bytes) -> np.ndarray:
    """8x8 YCbCr cell means (192) and 4x4 cells of 4-bin gradient-orientation histograms (64),
    each block centred and unit-norm so that neither dominates the cosine."""
    from PIL import Image

    with Image.open(io.BytesIO(image_bytes)) as image:
        image.draft("RGB", (128, 128))  # JPEG: decode at 1/8 scale, enough for 8x8 cells
        small = image.convert("RGB")
    ycc = np.asarray(small.convert("YCbCr").resize((8, 8), Image.Resampling.BOX), dtype=np.float32) / 255.0 - 0.5
    grey = np.asarray(small.convert("L").resize((64, 64), Image.Resampling.BOX), dtype=np.float32) / 255.0
    gx, gy = np.zeros_like(grey), np.zeros_like(grey)
    gx[:, 1:-1], gy[1:-1, :] = grey[:, 2:] - grey[:, :-2], grey[2:, :] - grey[:-2, :]
    magnitude = np.hypot(gx, gy)
    bins = (np.mod(np.arctan2(gy, gx), np.pi) / (np.pi / 4)).astype(np.int64).clip(0, 3)
    cells = (np.arange(64) // 16)[:, None] * 4 + (np.arange(64) // 16)[None, :]
    hist = np.bincount((cells * 4 + bins).ravel(), weights=magnitude.ravel(), minlength=64).reshape(16, 4)
    hist = np.sqrt(hist / np.maximum(hist.sum(axis=1, keepdims=True), 1e-6)) - 0.5  # Hellinger, centred
    blocks = [ycc.ravel(), hist.ravel().astype(np.float32)]
    return np.concatenate([b / max(float(np.linalg.norm(b)), 1e-6) for b in blocks])


# --- loaded models ---------------------------------------------------------------------------


class Embedder:
    """A loaded model: frames (JPEG/PNG bytes) and, for CLIP, texts to unit vectors."""

    def __init__(self, model: EmbeddingModel):
        self.model = model
        self._net = self._preprocess = self._tokenizer = None
        if model.kind == "clip":
            self._load_clip()
        elif model.kind == "detector":
            self._load_detector()

    def _load_clip(self) -> None:
        open_clip = _open_clip()
        # A local folder, file or cached file: open_clip reads it from disk, never from the hub.
        net, _, preprocess = open_clip.create_model_and_transforms(self.model.architecture, pretrained=self.model.weights)
        self._net, self._preprocess = net.eval(), preprocess
        self._tokenizer = open_clip.get_tokenizer(self.model.architecture)

    def _load_detector(self) -> None:
        self._net = detector.build_detector(detector.get_profile(self.model.profile), self.model.weights).eval()

    def embed_images(self, frames: list[bytes]) -> np.ndarray:
        """(len(frames), dim) float32 unit vectors; a frame that does not decode raises."""
        if any(not f for f in frames):
            raise ValueError("frame has no image bytes")
        if not frames:
            return np.zeros((0, self.model.dim), dtype=np.float32)
        if self.model.kind == COLOR_LAYOUT:
            return unit_rows(np.stack([_color_layout(f) for f in frames]))
        import torch

        with torch.inference_mode():
            features = self._clip_images(frames) if self.model.kind == "clip" else self._backbone(frames)
        return unit_rows(features.float().numpy())

    def _clip_images(self, frames: list[bytes]):
        import torch
        from PIL import Image

        images = []
        for frame in frames:
            with Image.open(io.BytesIO(frame)) as image:
                images.append(self._preprocess(image.convert("RGB")))
        return self._net.encode_image(torch.stack(images))

    def _backbone(self, frames: list[bytes]):
        import torch

        from avperception_assets.storage.decoding import decode

        images = [decode(f).float() / 255.0 for f in frames]
        batch, _ = self._net.transform(images)
        levels = self._net.backbone(batch.tensors)
        return torch.stack([level.mean(dim=(2, 3)) for level in levels.values()]).mean(dim=0)

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) unit vectors from CLIP's text tower; other models have none."""
        if not self.model.has_text_tower:
            raise EmbeddingError(f"text search needs a model with a text tower; {self.model.label} has none. "
                                 "Configure CLIP as the embedding model (clip:<architecture>:<weights>) and recompute "
                                 "the embedding column.")
        import torch

        with torch.inference_mode():
            return unit_rows(self._net.encode_text(self._tokenizer(texts)).float().numpy())


_LOADED: dict[EmbeddingModel, Embedder] = {}


def load(model: EmbeddingModel) -> Embedder:
    """The loaded model, once per process (Geneva may unpickle a UDF per task)."""
    if model not in _LOADED:
        _LOADED[model] = Embedder(model)
    return _LOADED[model]
