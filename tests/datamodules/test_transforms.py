import numpy as np
import pytest
import torch
from PIL import Image

from lightning_lt.datamodules import transforms as tf


@pytest.fixture
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_pil_and_tensor_cifar_transforms_agree(image):
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
    for seed in range(20):
        torch.manual_seed(seed)
        a = tf.cifar_train_transform(tf.CIFAR100_MEAN, tf.CIFAR100_STD)(image)
        torch.manual_seed(seed)
        b = tf.cifar_tensor_train_transform(tf.CIFAR100_MEAN, tf.CIFAR100_STD)(tensor)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(tf.cifar_eval_transform()(image), tf.cifar_tensor_eval_transform()(tensor), rtol=0, atol=1e-6)


def test_cifar_eval_matches_hand_normalisation(image):
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(tf.CIFAR10_MEAN)[:, None, None], torch.tensor(tf.CIFAR10_STD)[:, None, None]
    torch.testing.assert_close(tf.cifar_eval_transform()(image), (pixels - mean) / std)


def test_imagenet_transforms_shapes():
    big = Image.new("RGB", (300, 200))
    assert tf.imagenet_train_transform(96)(big).shape == (3, 96, 96)
    assert tf.imagenet_eval_transform(96)(big).shape == (3, 96, 96)
    # evaluation resizes the short side to size * 256 / 224 before the center crop
    assert tf.imagenet_eval_transform(224).transforms[0].size == 256
