"""Caption transforms: realised rates inside binomial intervals, kept tags, exposed decisions."""

import math
import random

import pytest

import sdplug
from sdplug.plan import CaptionPipeline

CAPTION = "sks dog, sitting, red collar, grass, sunny day, photo"


def binomial_bounds(p, n, z=3.29):  # 99.9%
    half = z * math.sqrt(p * (1 - p) / n)
    return p - half, p + half


@pytest.mark.parametrize("name", sdplug.available("caption"))
def test_contract_string_in_string_out_deterministic(name):
    transform = sdplug.create("caption", name)
    out = transform(CAPTION, epoch=0, rng=random.Random(3))
    assert isinstance(out, str)
    assert out == transform(CAPTION, epoch=0, rng=random.Random(3))


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5])
def test_dropout_realised_rate_inside_999_binomial_interval(rate):
    dropout = sdplug.create("caption", "dropout", rate=rate)
    rng = random.Random(0)
    n = 20_000
    dropped = sum(dropout(CAPTION, rng=rng) == "" for _ in range(n))
    low, high = binomial_bounds(rate, n)
    assert low <= dropped / n <= high


def test_dropout_every_n_epochs_drops_all_in_those_epochs():
    dropout = sdplug.create("caption", "dropout", rate=0.0, every_n_epochs=3)
    rng = random.Random(0)
    by_epoch = {epoch: {dropout.decide(epoch=epoch, rng=rng) for _ in range(50)} for epoch in range(7)}
    assert by_epoch == {0: {False}, 1: {False}, 2: {True}, 3: {False}, 4: {False}, 5: {True}, 6: {False}}


def test_dropout_decision_is_exposed_apart_from_the_text():
    dropout = sdplug.create("caption", "dropout", rate=0.3)
    decisions = [dropout.decide(rng=random.Random(i)) for i in range(200)]
    texts = [dropout(CAPTION, rng=random.Random(i)) for i in range(200)]
    assert [t == "" for t in texts] == decisions


def test_tag_dropout_keeps_first_tokens_and_realises_its_rate():
    transform = sdplug.create("caption", "tag_dropout", rate=0.25, keep_tokens=2)
    rng = random.Random(1)
    tail = CAPTION.split(", ")[2:]
    kept = 0
    n = 4000
    for _ in range(n):
        tags = transform(CAPTION, rng=rng).split(", ")
        assert tags[:2] == ["sks dog", "sitting"]
        assert all(t in tail for t in tags[2:])
        kept += len(tags) - 2
    low, high = binomial_bounds(0.75, n * len(tail))
    assert low <= kept / (n * len(tail)) <= high


def test_shuffle_keeps_head_and_permutes_the_rest():
    transform = sdplug.create("caption", "shuffle", keep_tokens=1)
    rng = random.Random(2)
    outputs = {transform(CAPTION, rng=rng) for _ in range(200)}
    for out in outputs:
        tags = out.split(", ")
        assert tags[0] == "sks dog"
        assert sorted(tags) == sorted(CAPTION.split(", "))
    assert len(outputs) > 50


def test_pipeline_reports_drops_and_cached_decisions_match_text_decisions():
    pipeline = CaptionPipeline([sdplug.create("caption", "dropout", rate=0.2)])
    text_path = [pipeline(CAPTION, rng=random.Random(i)).dropped for i in range(300)]
    cached_path = [pipeline.dropped(rng=random.Random(i))[0] for i in range(300)]
    assert text_path == cached_path
    assert 20 < sum(text_path) < 100


def test_cached_decisions_refuse_text_transforms():
    pipeline = CaptionPipeline([sdplug.create("caption", "shuffle")])
    with pytest.raises(sdplug.SdplugError, match="needs caption text"):
        pipeline.dropped(rng=random.Random(0))
