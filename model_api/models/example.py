"""`model-api export-example`: a small real classifier of handwritten digits, trained in seconds.

The data is scikit-learn's bundled 8x8 digits (1797 images, no download). A quarter of it, chosen by a
fixed split that does not depend on the seed, is held out; the network never sees it in training, and
the tests measure accuracy on it through the server. The seed changes the initial weights and hence the
exported weights, which gives tests two different deployments.

The program takes `pixels` (FP32, [-1, 64]: each image's 64 values scaled to [0, 1]) and returns
`logits` (FP32, [-1, 10]) and `label` (INT64, [-1], the predicted digit).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model_api.models.exported import SIGNATURE_FILE, TORCHSCRIPT_SUFFIXES

SIGNATURE = {
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ],
}


@dataclass(frozen=True)
class DigitsSplit:
    train_pixels: np.ndarray
    train_labels: np.ndarray
    test_pixels: np.ndarray
    test_labels: np.ndarray


def digits_split() -> DigitsSplit:
    """The fixed train / held-out split (75% / 25%, stratified), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.data / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, labels, test_size=0.25, random_state=0, stratify=labels
    )
    return DigitsSplit(train_x, train_y, test_x, test_y)


class DigitsClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.layers(pixels)
        return logits, logits.argmax(dim=1)


def train(split: DigitsSplit, seed: int, epochs: int) -> DigitsClassifier:
    """Full-batch Adam on the training part; deterministic for a given seed."""
    torch.manual_seed(seed)
    model = DigitsClassifier()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    pixels = torch.from_numpy(split.train_pixels)
    labels = torch.from_numpy(split.train_labels)
    loss_function = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        optimiser.zero_grad()
        loss = loss_function(model(pixels)[0], labels)
        loss.backward()
        optimiser.step()
    return model.eval()


@dataclass(frozen=True)
class ExportReport:
    path: Path
    held_out_accuracy: float
    held_out_count: int


def export_example(path: Path, seed: int = 0, epochs: int = 200) -> ExportReport:
    """Train the classifier and write it to `path`: torch.export for `.pt2`, TorchScript for `.pt`."""
    split = digits_split()
    model = train(split, seed, epochs)
    with torch.inference_mode():
        predicted = model(torch.from_numpy(split.test_pixels))[1].numpy()
    accuracy = float((predicted == split.test_labels).mean())
    path.parent.mkdir(parents=True, exist_ok=True)
    signature = {SIGNATURE_FILE: json.dumps(SIGNATURE)}
    example = (torch.from_numpy(split.train_pixels[:4]),)
    if path.suffix in TORCHSCRIPT_SUFFIXES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, str(path), _extra_files=signature)
    elif path.suffix == ".pt2":
        batch = torch.export.Dim("batch")
        program = torch.export.export(model, example, dynamic_shapes={"pixels": {0: batch}})
        torch.export.save(program, str(path), extra_files=signature)
    else:
        raise ValueError(f"{path}: the file name must end in .pt2 (torch.export) or .pt (TorchScript)")
    return ExportReport(path, accuracy, len(split.test_labels))
