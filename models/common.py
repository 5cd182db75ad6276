"""Shape arithmetic shared by the zoo: every model adapts to the dataset's image size."""

from __future__ import annotations


class InputTooSmallError(ValueError):
    """Raised when an image is too small for a model's downsampling stack."""


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def pool_out(size: int, kernel: int = 2, ceil: bool = False) -> int:
    return -(-size // kernel) if ceil else size // kernel


def check_input_shape(model_name: str, input_shape: tuple[int, ...], min_size: int) -> tuple[int, int, int]:
    """Validate (C, H, W) and refuse images smaller than the model can take."""
    if len(input_shape) != 3 or any(int(d) <= 0 for d in input_shape):
        raise ValueError(f"input_shape must be (channels, height, width) with positive sizes, got {tuple(input_shape)}")
    channels, height, width = (int(d) for d in input_shape)
    if min(height, width) < min_size:
        raise InputTooSmallError(
            f"{model_name} needs images of at least {min_size}x{min_size}, got {height}x{width}; use a larger dataset "
            "image size or a smaller model (dnn_2, dnn_4)"
        )
    return channels, height, width
