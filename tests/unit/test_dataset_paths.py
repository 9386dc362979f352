"""Where stage_data puts a framework's dataset: every object lands under the dataset directory, or none does."""

from __future__ import annotations

import pytest

from dtp.pipeline.s3_objects import relative_key


@pytest.mark.parametrize(
    ("key", "relative"),
    [
        ("m/train_text_document.bin", "train_text_document.bin"),
        ("m/tokenizer/tokenizer.json", "tokenizer/tokenizer.json"),
        ("m/..hidden", "..hidden"),
    ],
)
def test_keys_under_the_prefix_keep_their_relative_path(key: str, relative: str) -> None:
    assert relative_key(key, "m/") == relative


@pytest.mark.parametrize("key", ["m/../../etc/cron.d/x", "m/a/../../b", "m/./a", "m//a", "m/a/"])
def test_a_key_that_would_leave_the_dataset_directory_is_refused(key: str) -> None:
    with pytest.raises(ValueError, match=r"^dataset_uri: object .* is not a plain relative path under 'm/'$"):
        relative_key(key, "m/")
