"""Fashion-MNIST, offline, and the classifier that judges generated images.

The images come from Debian's `dataset-fashion-mnist` (installed by `make`): 60,000 train
and 10,000 test 28x28 greyscale items in ten classes, as gzipped IDX files. They are
padded to 32x32 and scaled to [-1, 1], the diffusion models' pixel range, so that a DiT
with patch size 2 sees 16 x 16 = 256 tokens.

`Classifier` is a small CNN trained by scripts/train_fashion_classifier.py and committed
as edgec/zoo/fashion-classifier. Generated images are scored by its accuracy on the
requested class, and by a Fréchet distance computed on its penultimate features against
the real test set: an FID in form, but not the Inception-based FID of the literature
(whose weights cannot be downloaded here), so it is reported as "FID (Fashion-MNIST
classifier features)" and only compared with itself.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from edgec.errors import BadInputError, MissingDependencyError

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SIZE = 32
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 1, 32, 32] float32 in [-1, 1] (the 28x28 item centred, background -1) and
    labels [N] int64."""
    images_name, labels_name = _FILES[split]
    if not (DATA_DIR / images_name).is_file():
        raise MissingDependencyError(f"Fashion-MNIST is not installed at {DATA_DIR}; run `make install` "
                                     "(Debian package dataset-fashion-mnist)")
    with gzip.open(DATA_DIR / images_name, "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(DATA_DIR / labels_name, "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)
    pad = (SIZE - 28) // 2
    images = np.full((raw.shape[0], 1, SIZE, SIZE), -1.0, dtype=np.float32)
    images[:, 0, pad : pad + 28, pad : pad + 28] = raw.astype(np.float32) / 127.5 - 1.0
    return images, labels


def classifier_module():  # -> torch.nn.Module class; torch is imported only where the classifier is used
    import torch
    from torch import nn

    class Classifier(nn.Module):
        """Three conv blocks, then a 256-wide feature layer (the FID features) and the logits."""

        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            )
            self.features = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 256), nn.ReLU())
            self.head = nn.Linear(256, len(CLASSES))

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.features(self.convs(images))
            return self.head(features), features

    return Classifier


def load_classifier(path: Path):  # -> Classifier in eval mode
    from safetensors.torch import load_file

    weights = path / "model.safetensors"
    if not weights.is_file():
        raise BadInputError(f"{path}: no model.safetensors; scripts/train_fashion_classifier.py writes it")
    model = classifier_module()()
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def classify(model, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes [N] and penultimate features [N, 256] of images in [-1, 1]."""
    import torch

    predicted, features = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            logits, feats = model(torch.from_numpy(np.ascontiguousarray(images[start : start + batch], dtype=np.float32)))
            predicted.append(logits.argmax(-1).numpy())
            features.append(feats.numpy().astype(np.float64))
    return np.concatenate(predicted), np.concatenate(features)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(root).all():  # near-singular product: the usual small offset on the diagonals
        offset = np.eye(len(mu_a)) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(root)))
