from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

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


# ------------------------------------------------------------------ batched form (device-resident path)
def pil_transform_with_draws(transform, image, top: int, left: int, flip: int) -> torch.Tensor:
    """The PIL training transform (``RandomCrop(size, padding)`` + ``RandomHorizontalFlip`` + ``ToTensor`` +
    ``Normalize``) made to use the given crop offsets and flip decision instead of drawing its own."""
    crop, flipper = transform.transforms[-4], transform.transforms[-3]
    assert isinstance(crop, T.RandomCrop) and isinstance(flipper, T.RandomHorizontalFlip)
    size = crop.size
    with mock.patch.object(T.RandomCrop, "get_params", return_value=(top, left, size[0], size[1])) as params, \
            mock.patch.object(flipper, "p", float(flip)):  # rand() < 1 always flips, rand() < 0 never
        out = transform(image)
    params.assert_called_once()
    return out


def test_batch_augment_equals_the_pil_transform_for_the_same_draws():
    """`apply_batch` crops, flips and normalises a whole batch (gathered by index) exactly as torchvision's
    RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize do each image, for the same crop
    offsets and flips: every corner offset and both flips, plus random draws."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    pils = [Image.fromarray(p) for p in pixels]
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    augment = tf.cifar_tensor_train_transform(tf.CIFAR100_MEAN, tf.CIFAR100_STD)
    pil = tf.cifar_train_transform(tf.CIFAR100_MEAN, tf.CIFAR100_STD)
    corners = torch.tensor([[t, l, f] for t in (0, 8) for l in (0, 8) for f in (0, 1)]).T  # noqa: E741
    draws = torch.cat([corners, augment.draw(40, 32, 32, torch.Generator().manual_seed(1))], dim=1)
    assert set(draws[0].tolist()) == set(range(9)) and set(draws[2].tolist()) == {0, 1}
    index = torch.arange(draws.shape[1]) % len(pils)
    batch = augment.apply_batch(images, index, draws)
    assert batch.shape == (draws.shape[1], 3, 32, 32) and batch.dtype == torch.float32
    for k in range(draws.shape[1]):
        top, left, flip = draws[:, k].tolist()
        expected = pil_transform_with_draws(pil, pils[int(index[k])], top, left, flip)
        torch.testing.assert_close(batch[k], expected, rtol=0, atol=0)


def test_batch_augment_with_other_sizes_and_padding():
    """A 12x10 image, crop 8, padding 1 (the folder path's image_size // 8 rule at 8 px), against the PIL transform."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (3, 12, 10, 3), dtype=np.uint8)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    augment = tf.cifar_tensor_train_transform(size=8, padding=1)
    pil = tf.cifar_train_transform(size=8, padding=1)
    draws = augment.draw(30, 12, 10, torch.Generator().manual_seed(2))
    assert draws[0].max() <= 12 + 2 - 8 and draws[1].max() <= 10 + 2 - 8
    index = torch.arange(30) % 3
    batch = augment.apply_batch(images, index, draws)
    for k in range(30):
        expected = pil_transform_with_draws(pil, Image.fromarray(pixels[int(index[k])]), *draws[:, k].tolist())
        torch.testing.assert_close(batch[k], expected, rtol=0, atol=0)


def test_batch_eval_equals_the_pil_eval_transform(image):
    images = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].repeat(2, 1, 1, 1)
    batch = tf.cifar_tensor_eval_transform().apply_batch(images, torch.tensor([1, 0, 1]))
    for x in batch:
        torch.testing.assert_close(x, tf.cifar_eval_transform()(image), rtol=0, atol=0)


def test_batch_draws_follow_the_generator_and_check_the_crop():
    augment = tf.cifar_tensor_train_transform()
    a = augment.draw(500, 32, 32, torch.Generator().manual_seed(3))
    b = augment.draw(500, 32, 32, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, augment.draw(500, 32, 32, torch.Generator().manual_seed(4)))
    assert a.shape == (3, 500) and a[:2].min() == 0 and a[:2].max() == 8
    assert 0.4 < a[2].float().mean() < 0.6
    with pytest.raises(ValueError, match="larger than the padded image"):
        tf.cifar_tensor_train_transform(size=48).draw(1, 32, 32)
    with pytest.raises(ValueError, match="draws"):
        augment.apply_batch(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.tensor([0]))


# ------------------------------------------------------------------ config-friendly recipes and output checks
def test_recipe_classes_are_the_recipe_functions(image):
    """The classes a config names by class_path give the functions' outputs for the same draws."""
    pairs = [
        (tf.CIFARTrainTransform(), tf.cifar_train_transform()),
        (tf.CIFAREvalTransform(resize=24), tf.cifar_eval_transform(resize=24)),
        (tf.ImageNetTrainTransform(48), tf.imagenet_train_transform(48)),
        (tf.ImageNetEvalTransform(48), tf.imagenet_eval_transform(48)),
    ]
    for recipe, function in pairs:
        torch.manual_seed(0)
        a = recipe(image)
        torch.manual_seed(0)
        torch.testing.assert_close(a, function(image), rtol=0, atol=0)
    assert tf.ImageNetEvalTransform(224).transforms[0].size == 256  # Resize(256) + CenterCrop(224)
    assert tf.ImageNetEvalTransform(112, resize=128).transforms[0].size == 128
    crop = tf.ImageNetTrainTransform(64, scale=(0.5, 1.0)).transforms[0]
    assert isinstance(crop, T.RandomResizedCrop) and crop.scale == (0.5, 1.0)


def test_recipes_without_flip_and_with_one_channel(image):
    """`hflip=False` never flips (digits, text): every output is an unflipped crop; a 1-value mean / std normalises
    1-channel images."""
    recipe = tf.CIFARTrainTransform(hflip=False, padding=0)  # no padding: the only crop is the image itself
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in recipe.transforms)
    expected = tf.cifar_eval_transform()(image)
    for seed in range(10):
        torch.manual_seed(seed)
        torch.testing.assert_close(recipe(image), expected)
    gray = Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8), mode="L")
    x = tf.CIFAREvalTransform(resize=32, mean=[0.5], std=[0.5])(gray)
    assert x.shape == (1, 32, 32) and -1 <= float(x.min()) and float(x.max()) <= 1


class Listed(torch.utils.data.Dataset):
    def __init__(self, items, transform=None) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index], 0


def test_check_transform_output_names_the_transform_and_the_fix():
    same = Listed([torch.zeros(3, 8, 8)] * 3)
    tf.check_transform_output(same, "train_transform")  # one size: fine
    tf.check_transform_output(Listed([]), "train_transform")  # nothing to check
    sizes = Listed([torch.zeros(3, 8, 8), torch.zeros(3, 8, 8), torch.zeros(3, 9, 8)], transform="MyTransform()")
    with pytest.raises(ValueError) as info:
        tf.check_transform_output(sizes, "train_transform")
    message = str(info.value)
    for part in ("`train_transform`", "different sizes", "(3, 8, 8) for sample 0", "(3, 9, 8) for sample 2",
                 "HINT", "Resize", "CenterCrop", "MyTransform()"):
        assert part in message, part
    pil = Listed([Image.new("RGB", (8, 8))] * 2, transform="Compose([Resize(8)])")
    with pytest.raises(ValueError, match=r"`eval_transform` returns a PIL.Image.Image, not a tensor.*HINT.*ToImage"):
        tf.check_transform_output(pil, "eval_transform")


def test_check_transform_output_leaves_the_random_state_alone():
    class Draws(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index):
            return torch.rand(3, 2, 2), 0

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    tf.check_transform_output(Draws(), "train_transform")
    torch.testing.assert_close(torch.rand(3), expected)
