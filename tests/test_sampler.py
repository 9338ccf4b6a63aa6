"""The data order: seeded, resumable, identical for any number of processes."""

from __future__ import annotations

import random

from dpokit.data.sampler import PairSampler


def steps(sampler: PairSampler, n: int) -> list[list[list[int]]]:
    """The next `n` optimizer steps' micro-batches, consumed as training consumes them: read, then advanced."""
    taken = []
    for _ in range(n):
        taken.append(sampler.step_indices(sampler.steps_done))
        sampler.advance()
    return taken


def test_two_ranks_together_see_what_one_process_sees():
    one = PairSampler(40, batch_size=4, accumulation_steps=2, world_size=1, seed=3)
    ranks = [PairSampler(40, batch_size=2, accumulation_steps=2, world_size=2, rank=r, seed=3) for r in range(2)]
    for _ in range(12):  # crosses epoch boundaries (5 steps per epoch)
        single = steps(one, 1)[0]
        split = [steps(s, 1)[0] for s in ranks]
        for micro in range(2):
            assert sorted(single[micro]) == sorted(split[0][micro] + split[1][micro])


def test_each_epoch_is_a_new_permutation_without_the_incomplete_tail():
    sampler = PairSampler(10, batch_size=3, seed=0)
    epoch0 = [i for step in steps(sampler, 3) for micro in step for i in micro]
    epoch1 = [i for step in steps(sampler, 3) for micro in step for i in micro]
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9
    assert epoch0 != epoch1


def test_state_dict_resumes_mid_epoch():
    a = PairSampler(50, batch_size=4, seed=1)
    steps(a, 7)
    b = PairSampler(50, batch_size=4, seed=1)
    b.load_state_dict(a.state_dict())
    assert steps(a, 10) == steps(b, 10)


def test_group_by_length_makes_batches_of_similar_length():
    rng = random.Random(0)
    lengths = [rng.randint(10, 1000) for _ in range(512)]
    grouped = PairSampler(512, batch_size=8, seed=0, lengths=lengths)
    plain = PairSampler(512, batch_size=8, seed=0)

    def padding(sampler):
        total = 0
        for step in steps(sampler, 64):
            batch = [lengths[i] for i in step[0]]
            total += max(batch) * len(batch) - sum(batch)
        return total

    assert padding(grouped) < 0.2 * padding(plain)
    again = PairSampler(512, batch_size=8, seed=0, lengths=lengths)
    assert steps(again, 5) == steps(PairSampler(512, batch_size=8, seed=0, lengths=lengths), 5)


def test_a_step_is_the_same_pairs_whether_drawn_in_order_or_prepared_ahead():
    drawn = PairSampler(num_examples=23, batch_size=2, accumulation_steps=2, world_size=2, rank=1, seed=3)
    ahead = PairSampler(num_examples=23, batch_size=2, accumulation_steps=2, world_size=2, rank=1, seed=3)
    in_order = steps(drawn, 12)  # 2 steps an epoch: over several epoch boundaries
    assert [ahead.step_indices(step) for step in range(12)] == in_order
    assert ahead.state_dict() == {"epoch": 0, "step_in_epoch": 0}  # preparing ahead consumes nothing
    for _ in range(12):
        ahead.advance()
    assert ahead.state_dict() == drawn.state_dict() and ahead.steps_done == 12
