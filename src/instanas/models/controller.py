"""The controller: a small CNN that maps an image to per-module selection probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import uniform
from ..nn.ops import ConvBNAct, fold_batchnorm
from ..space import ControllerSpec as ControllerSpec  # the shape it is built to


class ResidualBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, out_channels, 3, stride)
        self.conv2 = ConvBNAct(out_channels, out_channels, 3, relu=False)
        self.shortcut = (
            ConvBNAct(in_channels, out_channels, 1, stride, relu=False)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(self.conv2(self.conv1(x)) + shortcut)


# Adam moves a parameter by about its learning rate per step; the gain gives the two numbers
# per module of the difficulty form the reach that the free form's logits get from summing
# many feature weights, so a search of a few hundred steps can still settle each module.
PLACEMENT_GAIN = 10.0


class Controller(nn.Module):
    """ResNet-8 style policy network: sigmoid probabilities [B, cells, modules] per image.

    ``spec.widths`` gives one residual stage per entry. Empty widths make a linear controller:
    the logits are a linear function of the thumbnail's pixels (three operators at batch 1),
    for children so small that any convolutional controller would be a large share of their
    latency.

    ``spec.form == "difficulty"``: the features give one number per image, a difficulty logit
    d (trained by the search to predict whether the current greedy child gets the image wrong),
    and module m's logit is ``base[m] + softplus(slope[m]) * (sigmoid(d) - 1/2)``. The policy
    gradient then only has to learn two numbers per module, where along the difficulty each
    module starts, instead of per-image features from a noisy reward; the greedy children form
    a ladder ordered by d, each harder image running a superset of an easier one's modules.
    """

    def __init__(
        self,
        in_channels: int,
        num_cells: int,
        num_modules: int,
        spec: ControllerSpec = ControllerSpec(),
    ) -> None:
        super().__init__()
        self.spec = spec
        self.in_channels = in_channels
        self.num_cells, self.num_modules = num_cells, num_modules
        if spec.widths:
            self.stem = ConvBNAct(in_channels, spec.widths[0], 3)
            blocks, channels = [], spec.widths[0]
            for i, width in enumerate(spec.widths):
                blocks.append(ResidualBlock(channels, width, 1 if i == 0 else 2))
                channels = width
            self.blocks = nn.Sequential(*blocks)
        else:
            channels = in_channels * spec.input_size**2
        if spec.form == "difficulty":
            self.difficulty = nn.Linear(channels, 1)
            # Zero: every image starts at difficulty 0, so every p starts at 0.5.
            nn.init.zeros_(self.difficulty.weight)
            nn.init.zeros_(self.difficulty.bias)
            self.base = nn.Parameter(torch.zeros(num_cells, num_modules))
            self.slope = nn.Parameter(torch.zeros(num_cells, num_modules))  # softplus: >= 0
        elif spec.form == "free":
            self.logits = nn.Linear(channels, num_cells * num_modules)
            # Start from p = 0.5 everywhere, but with the weights small so early policies are
            # close to uniform exploration rather than an arbitrary fixed architecture.
            nn.init.normal_(self.logits.weight, std=1e-3)
            nn.init.zeros_(self.logits.bias)
        else:
            raise ValueError(f"unknown controller form {spec.form!r}: use 'free' or 'difficulty'")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Selection probabilities [B, cells, modules]."""
        return torch.sigmoid(self.policy_logits(x))

    def policy_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, cells, modules]; the greedy policy is ``logits >= 0`` (p >= 0.5)."""
        return self.logits_and_difficulty(x)[0]

    def logits_and_difficulty(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Policy logits [B, cells, modules] and, in the difficulty form, the difficulty logit
        [B] (None in the free form)."""
        features = self.features(x)
        if self.spec.form == "free":
            return self.logits(features).view(-1, self.num_cells, self.num_modules), None
        difficulty = self.difficulty(features).squeeze(1)
        # Detached: d is learned from its own target; the policy gradient only places the
        # modules along P(hard) = sigmoid(d), centred, which keeps the logits' spread over the
        # images within the base's reach (so the budget can be met). A non-negative slope: a
        # harder image runs every module an easier one runs, and more.
        hardness = torch.sigmoid(difficulty.detach())[:, None, None] - 0.5
        position = self.base + F.softplus(self.slope) * hardness
        return PLACEMENT_GAIN * position, difficulty

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features of the thumbnail (the thumbnail itself when linear)."""
        x = self.thumbnail(x)
        if self.spec.widths:
            return self.blocks(self.stem(x)).mean(dim=(2, 3))
        return x.flatten(1)

    def thumbnail(self, x: torch.Tensor) -> torch.Tensor:
        """Images resized to the controller's input side: area pooling down, bilinear up."""
        size = self.spec.input_size
        if x.shape[-1] > size:
            return F.adaptive_avg_pool2d(x, size)
        if x.shape[-1] < size:
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def deploy(self) -> "Controller":
        return fold_batchnorm(self)


def bound_probabilities(probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """Probability bounding for exploration: p~ = a*p + (1-a)*(1-p), keeps p~ in [1-a, a]."""
    return alpha * probs + (1.0 - alpha) * (1.0 - probs)


def sample_policy(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bernoulli sample of a bool policy from (bounded) probabilities."""
    if generator is None:
        return torch.rand_like(probs) < probs
    return uniform(tuple(probs.shape), generator, probs.dtype).to(probs.device) < probs


def greedy_policy(probs: torch.Tensor) -> torch.Tensor:
    return probs >= 0.5


def policy_log_prob(probs: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
    """Sum over entries of log P(policy | probs), per image: [B]."""
    probs = probs.clamp(1e-6, 1 - 1e-6)
    chosen = torch.where(policy, probs, 1 - probs)
    return chosen.log().flatten(1).sum(dim=1)


def policy_entropy(probs: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """Entropy bonus per image [B]: ``paper`` sum(-p log p) (largest at p = 1/e, below the
    greedy threshold), ``bernoulli`` sum(-p log p - (1-p) log(1-p)) (largest at p = 0.5)."""
    if form == "paper":
        probs = probs.clamp(1e-6, 1.0)
        terms = -probs * probs.log()
    elif form == "bernoulli":
        probs = probs.clamp(1e-6, 1 - 1e-6)
        terms = -probs * probs.log() - (1 - probs) * (1 - probs).log()
    else:
        raise ValueError(f"unknown entropy form {form!r}: use 'paper' or 'bernoulli'")
    return terms.flatten(1).sum(dim=1)
