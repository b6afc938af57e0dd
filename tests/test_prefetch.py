"""The prefetching loader: same stream as the plain sampler, exact state, deterministic mixture changes."""
from __future__ import annotations

import pytest
import torch

from megareweight.data.mixture import MixtureSampler
from megareweight.data.prefetch import PrefetchLoader
from megareweight.data.shards import PreparedData


def make_sampler(prepared_dir, seed: int = 3) -> MixtureSampler:
    data = PreparedData.open(prepared_dir)
    return MixtureSampler(data.shards("train", data.domains), {"code": 0.5, "prose": 0.3, "numbers": 0.2},
                          seq_len=16, micro_batch_size=3, rank=1, world_size=2, seed=seed)


def assert_same_batch(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("depth", [1, 3])
def test_yields_the_plain_sampler_stream(prepared_dir, depth):
    plain, loader = make_sampler(prepared_dir), PrefetchLoader(make_sampler(prepared_dir), depth)
    for _ in range(12):
        assert_same_batch(loader.next_batch(), plain.next_batch())
        # Metrics read between steps describe the consumed batches, not the prefetched ones.
        assert loader.state_dict() == plain.state_dict()
        assert loader.epochs() == plain.epochs() and loader.tokens_consumed() == plain.tokens_consumed()
    loader.close()


@pytest.mark.parametrize("consumed", [0, 1, 5])
def test_state_after_consumed_batches_resumes_exactly(prepared_dir, consumed):
    reference = make_sampler(prepared_dir)
    expected = [reference.next_batch() for _ in range(consumed + 4)]
    loader = PrefetchLoader(make_sampler(prepared_dir), depth=3)
    for _ in range(consumed):
        loader.next_batch()
    state = loader.state_dict()  # the background thread is several batches ahead by now
    loader.close()
    resumed = make_sampler(prepared_dir)
    resumed.load_state_dict(state)
    for batch in expected[consumed:]:
        assert_same_batch(resumed.next_batch(), batch)
    again = PrefetchLoader(make_sampler(prepared_dir), depth=2)
    again.load_state_dict(state)
    for batch in expected[consumed:]:
        assert_same_batch(again.next_batch(), batch)
    again.close()


def test_set_weights_and_load_state_drop_prefetched_batches(prepared_dir):
    new_mixture = {"code": 0.1, "prose": 0.1, "numbers": 0.8}
    plain, loader = make_sampler(prepared_dir), PrefetchLoader(make_sampler(prepared_dir), depth=3)
    for _ in range(3):
        assert_same_batch(loader.next_batch(), plain.next_batch())
    plain.set_weights(new_mixture)
    loader.set_weights(new_mixture)
    checkpoint = loader.state_dict()
    assert checkpoint == plain.state_dict()
    after = [plain.next_batch() for _ in range(4)]
    for batch in after:
        assert_same_batch(loader.next_batch(), batch)
    loader.load_state_dict(checkpoint)  # rewind while the thread is ahead
    for batch in after:
        assert_same_batch(loader.next_batch(), batch)
    loader.close()


def test_an_error_in_the_thread_reaches_the_consumer(prepared_dir):
    class Failing(MixtureSampler):
        def next_batch(self):
            if self.step == 2:
                raise OSError("shard read failed")
            return super().next_batch()

    data = PreparedData.open(prepared_dir)
    loader = PrefetchLoader(Failing(data.shards("train", data.domains), {"code": 1.0}, 16, 2), depth=2)
    loader.next_batch(), loader.next_batch()
    with pytest.raises(OSError, match="shard read failed"):
        loader.next_batch()
    assert loader.state_dict()["step"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batches_are_pinned_on_cuda(prepared_dir):
    loader = PrefetchLoader(make_sampler(prepared_dir), 2, pin_memory=True, device=torch.device("cuda", 0))
    assert all(t.is_pinned() for t in loader.next_batch().values())
    loader.close()
