"""StyleGAN2 generator and discriminator in plain PyTorch, state-dict compatible with the published
checkpoints GANSketching starts from (rosinality's layout: ``style.*``, ``convs.*``, ``to_rgbs.*``,
``noises.noise_*``; the discriminator's ``convs.*``, ``final_conv``, ``final_linear``).

No custom CUDA ops: the FIR filters (``upfirdn2d``) are depthwise convolutions. The modulated convolution
runs in the "non-fused" form: scale the input by the style, one ordinary convolution with the shared
weight for the whole batch, then scale the output by the demodulation coefficients. That is the same
function as the grouped per-sample-weight form, and much faster on CPUs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.stylegan2_layers import (
    SQRT2,
    Blur,
    EqualConv2d,
    EqualLinear,
    FusedLeakyReLU,
    PixelNorm,
    Upsample,
)

# Both networks compute in channels-last layout: oneDNN's depthwise (blur) and transposed convolutions are
# about 2x faster on it than on NCHW, and cuDNN prefers it too. Inputs and outputs stay plain NCHW tensors.
MEMORY_FORMAT = torch.channels_last


def default_channels(channel_multiplier: int = 2, channel_max: int = 512) -> dict[int, int]:
    """Width per resolution of the published architecture, optionally capped (small test/demo models)."""
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier,
            256: 64 * channel_multiplier, 512: 32 * channel_multiplier, 1024: 16 * channel_multiplier}
    return {res: min(ch, channel_max) for res, ch in base.items()}


def demodulation(s: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1/‖w·s‖ per (sample, output channel), without forming per-sample weights; at least float32, also
    under autocast (a bf16 sum over in·k·k terms would cost the coefficients their precision)."""
    dtype = torch.promote_types(s.dtype, torch.float32)
    with torch.autocast(s.device.type, enabled=False):
        return torch.rsqrt(s.to(dtype).square() @ weight.to(dtype).square().sum((2, 3)).t() + 1e-8)


class ModulatedConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False, blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.upsample, self.demodulate = upsample, demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_channels * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channels, bias_init=1)

    def modulated(self, x: torch.Tensor, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The convolution before demodulation, and the demodulation coefficients (B×out, or None).

        Demodulation scales whole output channels and the blur filters every channel alike, so the two
        commute: callers apply the coefficients wherever it is cheapest.
        """
        weight = self.weight[0] * self.scale  # out, in, k, k
        s = self.modulation(style)  # B, in
        x = x * s.view(s.shape[0], -1, 1, 1).to(x.dtype)
        if self.upsample:
            x = self.blur(F.conv_transpose2d(x, weight.transpose(0, 1).to(x.dtype), stride=2))
        else:
            x = F.conv2d(x, weight.to(x.dtype), padding=self.padding)
        return x, demodulation(s, weight) if self.demodulate else None

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        out, dcoefs = self.modulated(x, style)
        if dcoefs is None:
            return out
        return out * dcoefs.view(dcoefs.shape[0], -1, 1, 1).to(out.dtype)


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, image: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return image + self.scaled_noise(image, noise)

    def scaled_noise(self, image: torch.Tensor, noise: torch.Tensor | None = None,
                     gain: float = 1.0) -> torch.Tensor:
        """weight·noise (B×1×H×W), fresh normal noise when none is given."""
        if noise is None:
            b, _, h, w = image.shape
            noise = image.new_empty(b, 1, h, w).normal_()
        return (self.weight * gain).to(image.dtype) * noise.to(image.dtype)


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.input.expand(latent.shape[0], -1, -1, -1)


class StyledConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, style_dim: int,
                 upsample: bool = False, blur_kernel: Sequence[float] = (1, 3, 3, 1), demodulate: bool = True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, kernel_size, style_dim, demodulate=demodulate,
                                    upsample=upsample, blur_kernel=blur_kernel)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        # leaky(out·d + w_n·noise + b)·√2 = leaky(out·(√2·d) + (√2·w_n)·noise + √2·b): the gain, the
        # demodulation and the bias take one pass (addcmul), the noise one, the activation one, in place
        out, dcoefs = self.conv.modulated(x, style)
        b, c = out.shape[:2]
        scale = (dcoefs * SQRT2).view(b, c, 1, 1) if dcoefs is not None else out.new_full((1, 1, 1, 1), SQRT2)
        bias = self.activate.bias
        bias = (bias * SQRT2).view(1, c, 1, 1) if bias is not None else out.new_zeros(1, 1, 1, 1)
        out = torch.addcmul(bias.to(out.dtype), out, scale.to(out.dtype))
        out = out.add_(self.noise.scaled_noise(out, noise, gain=SQRT2))
        return F.leaky_relu(out, 0.2, inplace=True)


class ToRGB(nn.Module):
    def __init__(self, in_channels: int, style_dim: int, upsample: bool = True,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channels, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, style) + self.bias.to(x.dtype)
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class WShift(nn.Module):
    """GANSketching's learnable shift of w, applied after the mapping network (key ``style.9.w_shift``)."""

    def __init__(self, style_dim: int):
        super().__init__()
        self.w_shift = nn.Parameter(torch.zeros(1, style_dim))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.w_shift


class Generator(nn.Module):
    """StyleGAN2 generator with the published checkpoints' keys and call convention."""

    memory_format = MEMORY_FORMAT

    def __init__(self, size: int, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: int = 2,
                 lr_mlp: float = 0.01, w_shift: bool = False, blur_kernel: Sequence[float] = (1, 3, 3, 1),
                 channel_max: int = 512):
        super().__init__()
        log_size = int(math.log2(size))
        if 2**log_size != size or not 8 <= size <= 1024:
            raise ValueError(f"Generator size must be a power of two from 8 to 1024, got {size}")
        self.size, self.style_dim, self.log_size = size, style_dim, log_size
        self.arch = dict(size=size, style_dim=style_dim, n_mlp=n_mlp, channel_multiplier=channel_multiplier,
                         lr_mlp=lr_mlp, w_shift=w_shift, channel_max=channel_max)

        layers: list[nn.Module] = [PixelNorm()]
        layers += [EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True) for _ in range(n_mlp)]
        if w_shift:
            layers.append(WShift(style_dim))
        self.style = nn.Sequential(*layers)

        ch = default_channels(channel_multiplier, channel_max)
        self.channels = ch
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(ch[4], style_dim, upsample=False)

        self.num_layers = (log_size - 2) * 2 + 1
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer in range(self.num_layers):
            res = (layer + 5) // 2
            self.noises.register_buffer(f"noise_{layer}", torch.randn(1, 1, 2**res, 2**res))
        in_ch = ch[4]
        for i in range(3, log_size + 1):
            out_ch = ch[2**i]
            self.convs.append(StyledConv(in_ch, out_ch, 3, style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_ch, out_ch, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_ch, style_dim))
            in_ch = out_ch
        self.n_latent = log_size * 2 - 2

    # -- parameter groups used by the trainer ---------------------------------------------------------
    def named_trainable(self, subset: str) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters of a trained subset: ``mapping`` (the style MLP, incl. w_shift), ``w_shift``, ``all``."""
        if subset not in ("mapping", "w_shift", "all"):
            raise ValueError(f"unknown trained parameter subset {subset!r} (known: mapping, w_shift, all)")
        if subset == "w_shift" and not self.arch["w_shift"]:
            raise ValueError("trained subset 'w_shift' needs a generator built with w_shift=True")
        for name, p in self.named_parameters():
            if subset == "all" or (subset == "mapping" and name.startswith("style.")) or \
                    (subset == "w_shift" and name.endswith("w_shift")):
                yield name, p

    def trainable_parameters(self, subset: str) -> list[nn.Parameter]:
        """The parameters of a trained subset (see :meth:`named_trainable`)."""
        return [p for _, p in self.named_trainable(subset)]

    def mapping_parameters(self) -> list[nn.Parameter]:
        """The mapping network's parameters (``style.*``, including ``w_shift`` when present)."""
        return self.trainable_parameters("mapping")

    def get_latent(self, z: torch.Tensor) -> torch.Tensor:
        """w for a batch of z: the mapping network (then ``w_shift``, when the generator has one)."""
        return self.style(z)

    @torch.no_grad()
    def mean_latent(self, n_latent: int) -> torch.Tensor:
        z = torch.randn(n_latent, self.style_dim, device=self.input.input.device)
        return self.style(z).mean(0, keepdim=True)

    def make_noise(self) -> list[torch.Tensor]:
        device = self.input.input.device
        noises = [torch.randn(1, 1, 4, 4, device=device)]
        for i in range(3, self.log_size + 1):
            noises += [torch.randn(1, 1, 2**i, 2**i, device=device) for _ in range(2)]
        return noises

    def forward(self, styles: list[torch.Tensor], return_latents: bool = False, inject_index: int | None = None,
                truncation: float = 1, truncation_latent: torch.Tensor | None = None,
                input_is_latent: bool = False, noise: list[torch.Tensor | None] | None = None,
                randomize_noise: bool = True):
        if not input_is_latent:
            styles = [self.style(s) for s in styles]
        if noise is None:
            if randomize_noise:
                noise = [None] * self.num_layers
            else:
                noise = [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]
        if truncation < 1:
            styles = [truncation_latent + truncation * (s - truncation_latent) for s in styles]

        if len(styles) < 2:
            latent = styles[0] if styles[0].ndim == 3 else styles[0].unsqueeze(1).repeat(1, self.n_latent, 1)
        else:
            if inject_index is None:
                inject_index = random.randint(1, self.n_latent - 1)
            first = styles[0].unsqueeze(1).repeat(1, inject_index, 1)
            second = styles[1].unsqueeze(1).repeat(1, self.n_latent - inject_index, 1)
            latent = torch.cat([first, second], 1)

        out = self.input(latent).contiguous(memory_format=self.memory_format)
        out = self.conv1(out, latent[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for conv1, conv2, n1, n2, to_rgb in zip(self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2],
                                                self.to_rgbs):
            out = conv1(out, latent[:, i], noise=n1)
            out = conv2(out, latent[:, i + 1], noise=n2)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        image = skip.contiguous()
        return (image, latent) if return_latents else (image, None)


class ConvLayer(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, downsample: bool = False,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1), bias: bool = True, activate: bool = True):
        layers: list[nn.Module] = []
        if downsample:
            factor = 2
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                                  bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channels, bias=bias))
        super().__init__(*layers)
        self.downsample, self.activate = downsample, activate

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """The layer's output times ``gain``. The gain, the activation's √2 and its bias are folded into the
        convolution (leaky_relu(a·y) = a·leaky_relu(y) for a > 0), and the activation runs in place."""
        if self.downsample:
            x = self[0](x)
        conv = self[1] if self.downsample else self[0]
        bias = self[-1].bias if self.activate else conv.bias
        if self.activate:
            gain = gain * SQRT2
        out = F.conv2d(x, conv.weight * (conv.scale * gain), bias * gain if bias is not None else None,
                       stride=conv.stride, padding=conv.padding)
        return F.leaky_relu(out, 0.2, inplace=True) if self.activate else out


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.conv1 = ConvLayer(in_channels, in_channels, 3, blur_kernel=blur_kernel)
        self.conv2 = ConvLayer(in_channels, out_channels, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(in_channels, out_channels, 1, downsample=True, activate=False, bias=False,
                              blur_kernel=blur_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (main + skip) / √2 with the 1/√2 folded into both convolutions; the skip conv's output is free to
        # be overwritten (the activation's output is not: its backward reads it)
        skip = self.skip(x, gain=1 / SQRT2)
        return skip.add_(self.conv2(self.conv1(x), gain=1 / SQRT2))


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator with minibatch standard deviation, published key layout."""

    memory_format = MEMORY_FORMAT

    def __init__(self, size: int, channel_multiplier: int = 2, blur_kernel: Sequence[float] = (1, 3, 3, 1),
                 channel_max: int = 512, stddev_group: int = 4):
        super().__init__()
        log_size = int(math.log2(size))
        if 2**log_size != size or not 8 <= size <= 1024:
            raise ValueError(f"Discriminator size must be a power of two from 8 to 1024, got {size}")
        self.arch = dict(size=size, channel_multiplier=channel_multiplier, channel_max=channel_max)
        ch = default_channels(channel_multiplier, channel_max)
        convs: list[nn.Module] = [ConvLayer(3, ch[size], 1)]
        in_ch = ch[size]
        for i in range(log_size, 2, -1):
            out_ch = ch[2 ** (i - 1)]
            convs.append(ResBlock(in_ch, out_ch, blur_kernel))
            in_ch = out_ch
        self.convs = nn.Sequential(*convs)
        self.stddev_group, self.stddev_feat = stddev_group, 1
        self.final_conv = ConvLayer(in_ch + 1, ch[4], 3)
        self.final_linear = nn.Sequential(EqualLinear(ch[4] * 4 * 4, ch[4], activation=True),
                                          EqualLinear(ch[4], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs(x.contiguous(memory_format=self.memory_format))
        b, c, h, w = out.shape
        # largest group <= stddev_group that divides the batch (the published code needs b % 4 == 0)
        group = next(g for g in range(min(b, self.stddev_group), 0, -1) if b % g == 0)
        sd = out.reshape(group, -1, self.stddev_feat, c // self.stddev_feat, h, w)
        sd = torch.sqrt(sd.var(0, unbiased=False) + 1e-8)
        sd = sd.mean([2, 3, 4], keepdim=True).squeeze(2)
        sd = sd.repeat(group, 1, h, w)
        out = self.final_conv(torch.cat([out, sd], 1))
        return self.final_linear(out.reshape(b, -1))  # NCHW flattening order, whatever the layout
