"""A factory module with tied weights (a decoder weight that is its encoder's), written
into a test's folder by the import and saving tests."""

TIED_MODULE = '''
import torch
from torch import nn


class Tied(nn.Module):
    """A digits autoencoder-classifier whose decoder weight is its encoder weight."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.encoder = nn.Linear(64, 64, bias=False)
        self.decoder = nn.Linear(64, 64, bias=False)
        self.decoder.weight = self.encoder.weight
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.encoder(x.flatten(1)))
        return self.head(torch.tanh(self.decoder(h)))


def make(num_classes: int) -> nn.Module:
    return Tied(num_classes)
'''
