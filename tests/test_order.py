"""The global sample order: memory-free permutations, weighted mixing, resumable at any position."""

from collections import Counter

import numpy as np
import pytest

from tinyclip_ds.config import RecipeError
from tinyclip_ds.data.order import GlobalOrder, Permutation, quotas
from tinyclip_ds.data.sampler import GlobalBatchSampler


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 16, 17, 255, 1000, 4097])
def test_permutation_is_a_bijection(n):
    values = Permutation(n, key=3)(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))
    if n > 16:  # shuffled, and another key shuffles otherwise
        assert values.tolist() != list(range(n))
        assert values.tolist() != Permutation(n, key=4)(np.arange(n)).tolist()


def test_permutation_of_a_stretch_equals_the_whole_one():
    whole = Permutation(10_007, key=9)(np.arange(10_007))
    assert Permutation(10_007, key=9)(np.arange(5_000, 5_100)).tolist() == whole[5_000:5_100].tolist()


def test_permutation_spreads_positions_evenly():
    """Each tenth of the positions holds close to a tenth of every tenth of the values."""
    n = 100_000
    values = Permutation(n, key=1)(np.arange(n))
    counts = np.histogram2d(np.arange(n), values, bins=10)[0]
    assert counts.min() > 0.8 * n / 100 and counts.max() < 1.2 * n / 100


def test_quotas_follow_the_weights_and_add_up():
    assert quotas([10, 30], None) == [10, 30]
    assert quotas([10, 30], [3, 1]) == [30, 10]
    assert quotas([5, 5, 5], [1, 1, 1]) == [5, 5, 5]
    assert quotas([7, 3], [1, 2]) == [3, 7]  # 3.33 and 6.67 of 10
    assert sum(quotas([13, 1, 999], [0.1, 5, 2])) == 1013


def test_an_unweighted_epoch_is_a_permutation_of_every_source():
    order = GlobalOrder([7, 20, 3], seed=0)
    epochs = [order.indices(e, 0, 30).tolist() for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(30))
    assert epochs[0] != epochs[1] != epochs[2]
    assert order.indices(1, 10, 17).tolist() == epochs[1][10:17]


def test_weights_set_each_sources_share_of_every_epoch():
    order = GlobalOrder([10, 30], seed=1, weights=[3, 1])  # 30 draws of the 10, 10 of the 30
    for epoch in range(3):
        indices = order.indices(epoch, 0, order.epoch_length)
        small, large = indices[indices < 10], indices[indices >= 10]
        assert Counter(small.tolist()) == {i: 3 for i in range(10)}  # each repeated 3 times
        assert len(large) == 10 and len(set(large.tolist())) == 10  # a subset, no repeats
    subsets = [set(order.indices(e, 0, 40)[order.indices(e, 0, 40) >= 10].tolist()) for e in range(3)]
    assert subsets[0] != subsets[1]  # the sub-sampled source shows other samples each epoch
    assert order.source_of(np.array([0, 9, 10, 39])).tolist() == [0, 0, 1, 1]


def test_sources_are_interleaved_not_in_blocks():
    order = GlobalOrder([1000, 1000], seed=2, weights=[1, 1])
    first = order.source_of(order.indices(0, 0, 200))
    assert 70 < first.sum() < 130  # about half of any stretch from each source


def test_orders_of_laion_size_cost_no_memory():
    import tracemalloc

    tracemalloc.start()
    order = GlobalOrder([2_000_000_000, 50_000_000], seed=0, weights=[1, 1])
    indices = order.indices(3, 1_000_000_000, 1_000_004_096)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 2 ** 20  # an epoch's permutation as an array would take 16 GiB
    assert len(set(indices.tolist())) == 4096 and indices.max() < 2_050_000_000


def test_bad_weights_are_recipe_errors():
    with pytest.raises(RecipeError, match="has 1 weights for 2 sources"):
        GlobalOrder([3, 4], seed=0, weights=[1])
    with pytest.raises(RecipeError, match="positive"):
        GlobalOrder([3, 4], seed=0, weights=[1, 0])


def test_a_weighted_order_resumes_on_any_world_size():
    order = GlobalOrder([13, 40, 7], seed=4, weights=[2, 1, 1])
    micro, global_batch = 3, 12

    def keys(world, accumulation, start_step, steps):
        per_rank = []
        for rank in range(world):
            sampler = iter(GlobalBatchSampler(order, micro, accumulation, world, rank,
                                              start_position=start_step * accumulation))
            per_rank.append([next(sampler) for _ in range(steps * accumulation)])
        return [per_rank[r][s * accumulation + m] for s in range(steps)
                for m in range(accumulation) for r in range(world)]

    uninterrupted = keys(2, 2, 0, 9)  # 9 steps cross an epoch (60 // 12 = 5 steps per epoch)
    assert keys(1, 4, 4, 5) == uninterrupted[4 * 4:]
    assert keys(4, 1, 7, 2) == uninterrupted[7 * 4:]
    drawn = [i for batch in uninterrupted[:5 * 4] for i, _ in batch]
    assert drawn == order.indices(0, 0, 5 * global_batch).tolist()


def test_a_weight_too_small_for_one_sample_is_refused():
    with pytest.raises(RecipeError, match=r"'data.weights\[1\]' = 1e-06 gives source 1 \(500 samples\) no sample"):
        GlobalOrder([100_000, 500], seed=0, weights=[1, 1e-6])
    assert GlobalOrder([100_000, 500], seed=0, weights=[1, 1e-2]).quotas[1] > 0
